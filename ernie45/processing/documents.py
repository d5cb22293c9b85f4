"""Documents as model inputs: PDF pages (each page's text layer in reading order, and a rendering of the pages that
carry pictures or drawings or too little text), CSV / TSV tables and .xlsx sheets as text, plain text and Markdown.

A text page costs text tokens, not pixels: a page is rendered only where its text layer cannot stand for it. The
rendering's size comes from the image processor's pixel budget, so a page's nominal size never decides the memory
it takes. Hostile files are refused before anything is rendered: too many pages, absurd page sizes, encrypted or
corrupt PDFs each give one clear `ValueError`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .media import check_cancelled, describe, read_bytes

MAX_PAGES = 2000  # a PDF claiming more pages is refused unread
MAX_PAGE_POINTS = 14_400  # 200 inches: the largest page side PDF allows
MIN_PAGE_TEXT = 40  # characters: a page with less text (a scan, a chart) is rendered
MAX_TABLE_CELLS = 200_000
MAX_XLSX_BYTES = 64 << 20  # a workbook's unpacked size
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".log", ".json", ".xml", ".html", ".yaml", ".yml"}


@dataclass
class DocumentOptions:
    """pages: "1-5,9" (1-based, in the given order), or None for all. max_pages: refuse a selection longer than
    this. render: "auto" (pages with pictures, drawings or little text), "all" or "none". target_pixels: each
    rendering's size (default: the image processor's budget)."""

    pages: str | None = None
    max_pages: int = 500
    render: str = "auto"
    target_pixels: int = 1_000_000

    def __post_init__(self) -> None:
        if self.render not in ("auto", "all", "none"):
            raise ValueError(f"render is 'auto', 'all' or 'none', not {self.render!r}")


def page_selection(spec: str | None, count: int) -> list[int]:
    """0-based page indices from "1-5,9" (1-based, inclusive ranges), checked against the page count."""
    if spec is None or not str(spec).strip():
        return list(range(count))
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"pages: {part!r} is not a page number or a range like 3-7") from None
        if not 1 <= a <= b <= count:
            raise ValueError(f"pages: {part!r} is outside the document's pages 1-{count}")
        out += range(a - 1, b)
    return out


def kind_of(name: str | None, data: bytes) -> str:
    """ "pdf", "csv", "tsv", "xlsx" or "text", from the content's first bytes and then the file name."""
    if data[:5] == b"%PDF-":
        return "pdf"
    suffix = Path(name or "").suffix.lower()
    if suffix in (".csv", ".tsv", ".xlsx"):
        return suffix[1:]
    if data[:4] == b"PK\x03\x04" and suffix in ("", ".xlsx"):
        return "xlsx"
    return "text"


def document_parts(source: Any, name: str | None = None, options: DocumentOptions | None = None) -> list[dict]:
    """A document -> chat content parts in reading order: {"type": "text", "text": ...} and {"type": "image",
    "image": PIL image}. source: a path, bytes or a data: URL."""
    options = options or DocumentOptions()
    data = read_bytes(source)
    if isinstance(data, Path):
        name = name or data.name
        data = data.read_bytes()
    label = name or describe(source)
    kind = kind_of(name, data)
    if kind == "pdf":
        return _pdf_parts(data, label, options)
    if kind in ("csv", "tsv"):
        return [{"type": "text", "text": f"{label}:\n{table_text(data, label, kind)}"}]
    if kind == "xlsx":
        return [{"type": "text", "text": f"{label}, sheet {sheet}:\n{table}"} for sheet, table in sheets(data, label)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{label}: not a PDF, CSV, XLSX or UTF-8 text file") from None
    return [{"type": "text", "text": f"{label}:\n{text}"}]


def table_text(data: bytes, label: str, kind: str = "csv") -> str:
    """A CSV / TSV file as a Markdown table (quoting and non-ASCII as the csv module reads them)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{label}: the table is not UTF-8 text") from None
    delimiter = "\t" if kind == "tsv" else ","
    if kind == "csv":
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|").delimiter
        except csv.Error:
            pass
    return markdown(list(csv.reader(io.StringIO(text), delimiter=delimiter)), label)


def markdown(rows: list[list[str]], label: str) -> str:
    """Rows of cells as a Markdown table (the first row the header), empty rows dropped, within the cell limit."""
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"{label}: the table is empty")
    if sum(len(r) for r in rows) > MAX_TABLE_CELLS:
        raise ValueError(f"{label}: the table has more than {MAX_TABLE_CELLS:,} cells; send a part of it")
    width = max(len(r) for r in rows)

    def line(cells: list[str]) -> str:
        cells = [c.replace("|", "\\|").replace("\n", " ").strip() for c in cells] + [""] * (width - len(cells))
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * width, *(line(r) for r in rows[1:])])


def sheets(data: bytes, label: str) -> list[tuple[str, str]]:
    """Each non-empty sheet of an .xlsx workbook as (name, Markdown table) with the cells' values (formulas as
    last computed). A workbook that unpacks past MAX_XLSX_BYTES (a zip bomb) is refused before it is parsed."""
    import zipfile

    from openpyxl import load_workbook

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > MAX_XLSX_BYTES:
                raise ValueError(f"{label}: the workbook unpacks to more than {MAX_XLSX_BYTES >> 20} MiB")
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ValueError(f"{label}: not a readable .xlsx workbook ({e})") from None
    out = []
    try:
        formulas = None  # a formula no spreadsheet program has computed has no value: its text is shown instead
        for k, sheet in enumerate(book.worksheets):
            rows = _cells(sheet, label)
            if any(v is None for r in rows for v in r):
                formulas = formulas or load_workbook(io.BytesIO(data), read_only=True, data_only=False)
                rows = [[_shown(v, f) for v, f in zip(r, fr, strict=False)]
                        for r, fr in zip(rows, _cells(formulas.worksheets[k], label), strict=True)]  # fmt: skip
            text = [["" if v is None else str(v) for v in r] for r in rows]
            if any(any(c.strip() for c in r) for r in text):
                out.append((sheet.title, markdown(text, f"{label}, sheet {sheet.title}")))
    finally:
        book.close()
    if not out:
        raise ValueError(f"{label}: the workbook's sheets are empty")
    return out


def _shown(value: Any, formula: Any) -> Any:
    return formula if value is None and isinstance(formula, str) and formula.startswith("=") else value


def _cells(sheet, label: str) -> list[list]:
    rows, cells = [], 0
    for row in sheet.iter_rows(values_only=True):
        cells += len(row)
        if cells > MAX_TABLE_CELLS:
            raise ValueError(f"{label}: the workbook has more than {MAX_TABLE_CELLS:,} cells; send a part of it")
        rows.append(list(row))
    return rows


def _pdf_parts(data: bytes, label: str, options: DocumentOptions) -> list[dict]:
    return [part for _, parts in pdf_pages(data, label, options) for part in parts]


def pdf_pages(data: bytes, label: str, options: DocumentOptions | None = None) -> Iterator[tuple[int, list[dict]]]:
    """(page number, its parts) for the selected pages of a PDF, one page at a time: a long document is never all
    in memory at once."""
    import pypdfium2 as pdfium

    options = options or DocumentOptions()
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        message = str(e)
        if "password" in message.lower():
            raise ValueError(f"{label}: the PDF is encrypted; send it without a password") from None
        raise ValueError(f"{label}: not a readable PDF ({message})") from None
    try:
        count = len(pdf)
        if count > MAX_PAGES:
            raise ValueError(f"{label}: {count} pages, over the {MAX_PAGES} page limit")
        chosen = page_selection(options.pages, count)
        if len(chosen) > options.max_pages:
            raise ValueError(f"{label}: {len(chosen)} pages selected, over this request's {options.max_pages}; "
                             "choose fewer with pages=\"1-20\"")  # fmt: skip
        for i in chosen:
            check_cancelled()
            page = pdf[i]
            try:
                yield i + 1, _page_parts(page, i, label, options)
            finally:
                page.close()
    finally:
        pdf.close()


def _page_parts(page, i: int, label: str, options: DocumentOptions) -> list[dict]:
    width, height = page.get_size()
    if not (0 < width <= MAX_PAGE_POINTS and 0 < height <= MAX_PAGE_POINTS):
        raise ValueError(f"{label}: page {i + 1} is {width:.0f}x{height:.0f} points, beyond PDF's limits")
    textpage = page.get_textpage()
    text = textpage.get_text_bounded().replace("\r\n", "\n").replace("\r", "\n").strip()
    textpage.close()
    render = options.render == "all" or (options.render == "auto" and (_has_graphics(page) or
                                                                       len(text) < MIN_PAGE_TEXT))  # fmt: skip
    parts = [{"type": "text", "text": f"{label}, page {i + 1}:\n{text}" if text else f"{label}, page {i + 1}:"}]
    if render:
        scale = (options.target_pixels / (width * height)) ** 0.5  # points -> pixels within the budget
        parts.append({"type": "image", "image": page.render(scale=scale).to_pil().convert("RGB")})
    return parts


def _has_graphics(page) -> bool:
    """Whether a page carries pictures or drawn shapes (a chart, a figure) that its text cannot stand for."""
    import pypdfium2.raw as raw

    kinds = {obj.type for obj in page.get_objects(max_depth=2)}
    return bool(kinds & {raw.FPDF_PAGEOBJ_IMAGE, raw.FPDF_PAGEOBJ_PATH, raw.FPDF_PAGEOBJ_SHADING})


def is_file_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("file", "document")


def expand_files(messages: list[dict], options: DocumentOptions | None = None) -> list[dict]:
    """Messages with every file part replaced by its document parts. A file part is OpenAI's {"type": "file",
    "file": {"file_data": "data:...;base64,...", "filename": ...}}, or {"type": "file", "file": PATH or bytes}."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(is_file_part(p) for p in content):
            parts: list = []
            for p in content:
                parts += _file(p, options) if is_file_part(p) else [p]
            m = {**m, "content": parts}
        out.append(m)
    return out


def _file(part: dict, options: DocumentOptions | None) -> list[dict]:
    f = part.get("file", part.get("document"))
    if isinstance(f, dict):
        if "file_id" in f and "file_data" not in f:
            raise ValueError("file parts with a file_id need an uploaded-files store, which ernie45 does not keep; "
                             "send the file's bytes as file_data (a data: URL)")  # fmt: skip
        if not isinstance(f.get("file_data"), (str, bytes)):
            raise ValueError("a file part needs file_data (a data: URL of the file's bytes) and a filename")
        source, name = f["file_data"], f.get("filename")
        if isinstance(source, str) and not source.startswith("data:"):
            source = "data:application/octet-stream;base64," + source  # OpenAI also takes bare base64
        return document_parts(source, name, options)
    if isinstance(f, (str, Path, bytes)):
        return document_parts(f, None if isinstance(f, bytes) else Path(f).name, options)
    raise ValueError("a file part is {'type': 'file', 'file': {'file_data': ..., 'filename': ...}} or a path")
