"""Questions over documents longer than the context: map-reduce by pages.

Each file is read a page at a time (`processing.documents.pdf_pages`; a table by rows), pages are grouped into
chunks that fit the context, each chunk is asked the question (map: notes from those pages only, or "nothing"),
and the notes, each tagged with its pages, are combined into one answer that cites them (reduce; in rounds when the
notes themselves do not fit). Memory holds one chunk's pages at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import LLM, SamplingParams
from ..processing.documents import DocumentOptions, kind_of, pdf_pages, sheets, table_text
from ..processing.image import smart_resize

MAP = ("Read these pages and note what in them answers the question, with numbers and names as written. If "
       "nothing in them does, answer: nothing.\nQuestion: {question}")  # fmt: skip
REDUCE = (
    "Notes taken from parts of the documents, each tagged with its pages:\n{notes}\n\nAnswer the question from these "
    "notes. After each fact, cite its pages in brackets, like [report.pdf p. 3-4].\nQuestion: {question}"
)


@dataclass
class Chunk:
    source: str
    first: int
    last: int
    parts: list[dict] = field(default_factory=list)
    rows: bool = False  # first and last count table rows, not pages

    @property
    def cite(self) -> str:
        unit = "row" if self.rows else "p."
        pages = f"{unit} {self.first}" if self.first == self.last else f"{unit} {self.first}-{self.last}"
        return f"{self.source} {pages}"


@dataclass
class Analysis:
    answer: str
    notes: list[tuple[str, str]]  # (pages, note) for the chunks whose note was not "nothing"
    chunks: int


def chunks(files: list[str | Path], llm: LLM, budget: int,
           options: DocumentOptions | None = None) -> Iterator[Chunk]:  # fmt: skip
    """The files' pages in chunks of at most `budget` prompt tokens, one chunk in memory at a time."""
    proc = llm.processor
    options = options or DocumentOptions(target_pixels=proc.image.max_pixels, max_pages=10_000)
    for f in files:
        path = Path(f)
        data = path.read_bytes()
        kind = kind_of(path.name, data)
        if kind == "pdf":
            pages: Iterator[tuple[int, list[dict]]] = pdf_pages(data, path.name, options)
        elif kind in ("csv", "tsv", "xlsx"):
            tables = ([(path.name, table_text(data, path.name, kind))] if kind != "xlsx" else
                      [(f"{path.name}, sheet {name}", table) for name, table in sheets(data, path.name)])  # fmt: skip
            pages = (piece for label, table in tables for piece in _table_pieces(label, table, proc, budget // 2))
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path.name}: not a PDF, CSV, XLSX or UTF-8 text file") from None
            size = budget * 2  # characters: well under a token budget for any tokenizer
            pages = ((i // size + 1, [{"type": "text", "text": f"{path.name}, part {i // size + 1}:\n"
                                       + text[i : i + size]}]) for i in range(0, len(text), size))  # fmt: skip
        current: Chunk | None = None
        used = 0
        for number, parts in pages:
            cost = _tokens(proc, parts)
            if cost > budget:
                raise ValueError(f"{path.name} page {number} alone takes {cost} tokens, over the {budget} a chunk "
                                 "may use; give the model a larger context or render pages smaller")  # fmt: skip
            if current is not None and used + cost > budget:
                yield current
                current = None
            if current is None:
                current, used = Chunk(path.name, number, number, rows=kind in ("csv", "tsv", "xlsx")), 0
            current.parts += parts
            current.last, used = number if kind not in ("csv", "tsv", "xlsx") else _last_row(parts), used + cost
        if current is not None:
            yield current


def _table_pieces(name: str, table: str, proc, budget: int) -> Iterator[tuple[int, list[dict]]]:
    """A Markdown table in pieces of about `budget` tokens, each with the header row again; numbered from 1."""
    lines = table.splitlines()
    head, rows = lines[:2], lines[2:]
    start, piece, used = 0, [], 0
    for i, row in enumerate(rows):
        cost = len(proc.tokenizer.encode(row, add_special_tokens=False)) + 1
        if piece and used + cost > budget:
            yield start + 1, [_rows(name, head, piece, start)]
            start, piece, used = i, [], 0
        piece.append(row)
        used += cost
    if piece:
        yield start + 1, [_rows(name, head, piece, start)]


def _last_row(parts: list[dict]) -> int:
    header = parts[-1]["text"].split(":", 1)[0]  # "name, rows A-B"
    return int(header.rsplit("-", 1)[1])


def _rows(name: str, head: list[str], rows: list[str], start: int) -> dict:
    return {"type": "text", "text": f"{name}, rows {start + 1}-{start + len(rows)}:\n" + "\n".join(head + rows)}


def _tokens(proc, parts: list[dict]) -> int:
    """Prompt tokens these parts take (text tokenized; pictures by their patch grid)."""
    total = 0
    for p in parts:
        if p["type"] == "text":
            total += len(proc.tokenizer.encode(p["text"], add_special_tokens=False))
        else:
            image = p["image"]
            factor = proc.image.patch_size * proc.image.merge_size
            h, w = smart_resize(image.height, image.width, factor, proc.image.min_pixels, proc.image.max_pixels)
            total += (h // proc.image.patch_size) * (w // proc.image.patch_size) // proc.image.merge_size**2 + 8
    return total


def analyze(files: list[str | Path], question: str, llm: LLM | None = None, *, note_tokens: int = 96,
            answer_tokens: int = 256, progress: bool = True) -> Analysis:  # fmt: skip
    """Answer `question` over `files` (PDF, CSV / TSV, text) of any length by map-reduce over page chunks."""
    llm = llm or LLM()
    room = llm.max_model_len - max(note_tokens, answer_tokens) - 256  # the instructions and the template
    if room < 256:
        raise ValueError(f"the model's context ({llm.max_model_len} tokens) is too small to analyze documents")
    greedy = SamplingParams(max_tokens=note_tokens, temperature=0)
    notes: list[tuple[str, str]] = []
    count = 0
    bar = tqdm(desc="reading", unit="chunk", disable=not progress)
    for chunk in chunks(files, llm, room):
        count += 1
        message = [{"role": "user", "content": [*chunk.parts, {"type": "text", "text": MAP.format(question=question)}]}]
        note = llm.chat(message, greedy)[0].text.strip()
        if note and note.lower().strip(". ") != "nothing":
            notes.append((chunk.cite, note))
        bar.update(1)
        bar.set_postfix_str(chunk.cite)
    bar.close()
    if not notes:
        return Analysis("The documents say nothing about this.", [], count)
    final = SamplingParams(max_tokens=answer_tokens, temperature=0)
    rows = [f"[{cite}] {note}" for cite, note in notes]
    while True:  # combine; in rounds if the notes do not fit together
        groups, current, used = [], [], 0
        for r in rows:
            cost = len(llm.processor.tokenizer.encode(r, add_special_tokens=False))
            if current and used + cost > room:
                groups.append(current)
                current, used = [], 0
            current.append(r)
            used += cost
        groups.append(current)
        answers = [llm.chat([{"role": "user", "content": REDUCE.format(notes="\n".join(g), question=question)}],
                            final)[0].text.strip() for g in groups]  # fmt: skip
        if len(answers) == 1:
            return Analysis(answers[0], notes, count)
        rows = answers
