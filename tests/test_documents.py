"""Documents in: PDF pages (text layers, renderings of pages with charts or pictures), page selection, CSV tables,
hostile and broken files refused with one clear error, through `LLM.chat`, the server and the CLI."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import pytest
from doc_fixtures import make_pdf
from serve_fixtures import running_server

from ernie45.engine import LLM, SamplingParams
from ernie45.processing.documents import DocumentOptions, document_parts, page_selection, table_text

REPORT = [
    {"text": ["Quarterly report", "Revenue grew 12% to 4.1 million euros in the third quarter."]},
    {"chart": [20, 35, 50], "text": ["Figure 1: revenue by quarter"]},
    {"picture": (64, 48, (200, 30, 30))},
]


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the embedded demo model: it sees pictures


def _kinds(parts: list[dict]) -> list[str]:
    return [p["type"] for p in parts]


def test_pdf_pages_give_their_text_and_renderings_only_where_needed():
    parts = document_parts(make_pdf(REPORT), "report.pdf", DocumentOptions(target_pixels=40_000))
    assert _kinds(parts) == ["text", "text", "image", "text", "image"]  # a text page costs no pixels
    assert "Revenue grew 12% to 4.1 million euros" in parts[0]["text"] and parts[0]["text"].startswith("report.pdf")
    assert "Figure 1" in parts[1]["text"]
    w, h = parts[2]["image"].size
    assert 30_000 < w * h <= 41_000  # the rendering follows the pixel budget, not the page's size
    picked = document_parts(make_pdf(REPORT), "r.pdf", DocumentOptions(pages="3,1"))
    assert picked[0]["text"].startswith("r.pdf, page 3") and picked[-1]["text"].startswith("r.pdf, page 1")
    assert page_selection("2-4,1", 5) == [1, 2, 3, 0]
    for bad in ("0", "3-2", "x", "9"):
        with pytest.raises(ValueError, match="pages"):
            page_selection(bad, 5)


def test_hostile_and_broken_pdfs_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a readable PDF"):
        document_parts(b"%PDF-1.4\nthis is not a pdf", "broken.pdf")
    with pytest.raises(ValueError, match="beyond PDF's limits"):
        document_parts(make_pdf([{"text": ["huge"]}], size=(30_000, 30_000)), "huge.pdf")
    with pytest.raises(ValueError, match="over this request's 5"):
        document_parts(make_pdf([{"text": [f"page {i}"]} for i in range(8)]), "long.pdf", DocumentOptions(max_pages=5))
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(REPORT[:1]))))
    writer.encrypt("secret")
    locked = io.BytesIO()
    writer.write(locked)
    with pytest.raises(ValueError, match="encrypted"):
        document_parts(locked.getvalue(), "locked.pdf")


def test_a_200_page_pdf_reads_in_pages_within_the_selection():
    pdf = make_pdf([{"text": [f"Section {i}: the value we measured here is {i * 7}."]} for i in range(200)])
    parts = document_parts(pdf, "big.pdf", DocumentOptions(max_pages=500))
    assert len(parts) == 200 and "Section 199: the value we measured here is 1393." in parts[-1]["text"]
    assert len(document_parts(pdf, "big.pdf", DocumentOptions(pages="10-19"))) == 10


def test_csv_tables_keep_quoting_and_non_ascii():
    data = 'name,city,note\n"Müller, Anna",Zürich,"says ""hi"""\n李雷,北京,plain\n'.encode()
    table = table_text(data, "people.csv")
    lines = table.splitlines()
    assert lines[0] == "| name | city | note |" and lines[1] == "|---|---|---|"
    assert '| Müller, Anna | Zürich | says "hi" |' in lines and "| 李雷 | 北京 | plain |" in lines
    assert document_parts(b"a\tb\n1\t2\n", "t.tsv")[0]["text"].endswith("| 1 | 2 |")
    with pytest.raises(ValueError, match="not a readable .xlsx"):
        document_parts(b"PK\x03\x04rest", "sheet.xlsx")


def _workbook() -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    sales = book.active
    sales.title = "Sales"
    for row in (["item", "units", "note"], ["Müller", 3, "a|b"], ["B", 17, None], ["total", "=SUM(B2:B3)", None]):
        sales.append(row)
    book.create_sheet("Empty")
    book.create_sheet("Plan").append(["quarter", "target"])
    book["Plan"].append(["Q1", 1.5])
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def test_xlsx_sheets_are_tables_with_their_formulas_shown(llm, tmp_path):
    """Each non-empty sheet is a table; a formula no spreadsheet program has computed shows as its text, not as
    an empty cell; an unpacking bomb is refused before it is parsed; analyze reads a workbook by rows."""
    import zipfile

    from ernie45.jobs.analyze import chunks

    parts = document_parts(_workbook(), "book.xlsx")
    assert [p["text"].split(":", 1)[0] for p in parts] == ["book.xlsx, sheet Sales", "book.xlsx, sheet Plan"]
    assert "| Müller | 3 | a\\|b |" in parts[0]["text"] and "| total | =SUM(B2:B3) |  |" in parts[0]["text"]
    assert parts[1]["text"].endswith("| Q1 | 1.5 |")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xl/worksheets/sheet1.xml", b"0" * (65 << 20))
    with pytest.raises(ValueError, match="unpacks to more than 64 MiB"):
        document_parts(bomb.getvalue(), "bomb.xlsx")
    (tmp_path / "book.xlsx").write_bytes(_workbook())
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    cites = [c.cite for c in chunks([tmp_path / "book.xlsx"], llm, budget=400)]
    assert cites and all(c.startswith("book.xlsx row") for c in cites), cites
    with pytest.raises(ValueError, match="not a PDF, CSV, XLSX or UTF-8 text"):
        list(chunks([tmp_path / "blob.bin"], llm, budget=400))


def test_a_pdf_in_a_chat_goes_in_as_text_and_pictures(llm, tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(REPORT))
    parts = [{"type": "file", "file": str(path)}, {"type": "text", "text": "What grew?"}]
    message = [{"role": "user", "content": parts}]
    encoded = llm.processor.encode_chat(message)
    assert encoded["image_grid_thw"].shape[0] == 2  # the chart page and the picture page
    text = llm.processor.decode(encoded["input_ids"])
    assert "Revenue grew 12%" in text and "report.pdf, page 2" in text
    out = llm.chat(message, SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.finish_reason in ("stop", "length")


def test_documents_through_the_server_and_the_cli(llm, tmp_path):
    pdf = make_pdf(REPORT)
    url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()

    def body(file: dict) -> dict:
        parts = [{"type": "file", "file": file}, {"type": "text", "text": "What grew?"}]
        return {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}

    with running_server(llm, max_batch=2, max_len=4096, max_document_pages=2) as (base, _):
        post = lambda b: httpx.post(base + "/v1/chat/completions", json=b, timeout=120)  # noqa: E731
        over = post(body({"file_data": url, "filename": "report.pdf"}))  # 3 pages, 2 allowed
        assert over.status_code == 422 and "over this request's 2" in over.json()["error"]["message"]
        ok = post(body({"file_data": "data:application/pdf;base64," + base64.b64encode(make_pdf(REPORT[:2])).decode(),
                        "filename": "report.pdf"}))  # fmt: skip
        assert ok.status_code == 200, ok.text
        broken = post(body({"file_data": "data:application/pdf;base64," + base64.b64encode(b"%PDF-junk").decode(),
                            "filename": "x.pdf"}))  # fmt: skip
        assert broken.status_code == 422 and "PDF" in broken.json()["error"]["message"]
        assert post(body({"file_id": "file-123"})).status_code == 400
        assert httpx.get(base + "/health").json()["status"] == "ok"
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    run = subprocess.run([sys.executable, "-m", "ernie45", "generate", "What grew?", "--file", str(path), "--json",
                          "--max-tokens", "6"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-1500:]
    assert json.loads(run.stdout)["prompt_tokens"] > 100


def test_long_documents_are_read_a_chunk_at_a_time_in_bounded_memory(llm, tmp_path):
    """A 200-page PDF whose every page is rendered large, plus a table: the chunks come one at a time, so memory
    holds one chunk's pages, not the document's."""
    from pathlib import Path

    from ernie45.jobs.analyze import chunks

    pdf = tmp_path / "big.pdf"
    pdf.write_bytes(make_pdf([{"chart": [10 + i % 40, 30, 20], "text": [f"Section {i}: {i * 7} units shipped."]}
                              for i in range(200)]))  # fmt: skip
    table = tmp_path / "sales.csv"
    table.write_text("region,units\n" + "\n".join(f"r{i},{i * 3}" for i in range(300)))

    def rss(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) << 10

    options = DocumentOptions(target_pixels=2_000_000, max_pages=10_000)  # 6 MB a page: 1.2 GB if all were kept
    Path("/proc/self/clear_refs").write_text("5")
    before, seen, pages = rss("VmRSS:"), [], 0
    for chunk in chunks([pdf, table], llm, budget=1500, options=options):
        seen.append(chunk.cite)
        pages += sum(p["type"] == "image" for p in chunk.parts)
    grew = rss("VmHWM:") - before
    assert pages == 200 and seen[0].startswith("big.pdf p. 1-") and seen[-1].startswith("sales.csv row ")
    assert seen[-1].endswith("-300") and len(seen) > 3
    most = max(int(c.split("-")[1]) - int(c.split(" ")[-1].split("-")[0]) + 1 for c in seen if "p." in c)
    kept_all = 200 * 6_000_000  # every page's rendering at once
    assert grew < min(2 * most * 6_000_000 + (250 << 20), kept_all // 2), f"peak RSS rose {grew >> 20} MiB"


def test_analyze_answers_with_the_pages_it_read(llm, tmp_path):
    from ernie45.jobs.analyze import analyze

    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf([{"text": [f"Section {i}: the northern depot received {i * 7} units this week."]}
                              for i in range(6)]))  # fmt: skip
    result = analyze([pdf], "How many units did section 4 get?", llm, note_tokens=8, answer_tokens=8,
                     progress=False)  # fmt: skip
    assert result.chunks == 1 and isinstance(result.answer, str) and result.answer
    assert all(pages == "report.pdf p. 1-6" for pages, _ in result.notes)
