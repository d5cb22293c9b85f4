"""The jobs' own routes on a real server: /v1/documents/info and /v1/moderations/video (streamed and whole)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from serve_fixtures import running_server

from ernie45.engine import LLM
from ernie45.jobs.moderate import load_policy, moderate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def served():
    llm = LLM()
    with running_server(llm, max_batch=2, max_len=4096) as (url, _):
        yield llm, url


def test_document_info_says_pages_and_tokens_and_refuses_what_it_cannot_read(served):
    llm, url = served
    pdf = httpx.post(f"{url}/v1/documents/info", json={"file_data": _url(EXAMPLES / "report.pdf", "application/pdf"),
                                                       "filename": "report.pdf"}).json()  # fmt: skip
    import pypdfium2

    assert pdf["kind"] == "pdf" and pdf["pages"] == len(pypdfium2.PdfDocument(str(EXAMPLES / "report.pdf")))
    part = {"type": "file", "file": {"file_data": _url(EXAMPLES / "report.pdf", "application/pdf"),
                                     "filename": "report.pdf"}}  # fmt: skip
    assert pdf["tokens"] == len(llm.processor.encode_chat([{"role": "user", "content": [part]}])["input_ids"])
    csv = httpx.post(f"{url}/v1/documents/info", json={"file_data": _url(EXAMPLES / "sales.csv", "text/csv"),
                                                       "filename": "sales.csv"}).json()  # fmt: skip
    assert csv["kind"] == "csv" and "pages" not in csv and csv["tokens"] > 10
    broken = httpx.post(f"{url}/v1/documents/info", json={"file_data": "data:application/pdf;base64,JVBERi0xLjQKJeLj",
                                                          "filename": "cut.pdf"})  # fmt: skip
    assert broken.status_code == 422 and "not a readable PDF" in broken.json()["error"]["message"]
    bad = httpx.post(f"{url}/v1/documents/info", json={"file_data": "data:text/csv;base64,@@@", "filename": "a.csv"})
    assert bad.status_code == 400 and "base64" in bad.json()["error"]["message"]


def test_moderation_route_streams_the_verdicts_moderate_gives(served):
    llm, url = served
    policy = load_policy(EXAMPLES / "policy.yaml")
    want = list(moderate(EXAMPLES / "screened.mp4", policy, llm, length=2))
    body = {"model": "tiny", "video": _url(EXAMPLES / "screened.mp4", "video/mp4"),
            "policy": (EXAMPLES / "policy.yaml").read_text(), "window": 2}  # fmt: skip
    items = []
    with httpx.stream("POST", f"{url}/v1/moderations/video", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                items.append(json.loads(line[6:]))
    windows, summary = items[:-1], items[-1]
    assert [(w["start"], w["end"], w["labels"]) for w in windows] == [(v["start"], v["end"], v["labels"]) for v in want]
    assert all(w["thumbnail"].startswith("data:image/jpeg;base64,") for w in windows)
    assert summary["object"] == "moderation.summary" and summary["windows"] == len(want)

    whole = httpx.post(f"{url}/v1/moderations/video", timeout=120, json={
        **body, "stream": False, "thumbnails": False,
        "policy": {"categories": policy.categories, "instructions": policy.instructions}}).json()  # fmt: skip
    assert [w["labels"] for w in whole["windows"]] == [v["labels"] for v in want]
    assert "thumbnail" not in whole["windows"][0]


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [({"video": "data:video/mp4;base64,AAAA"}, 422, "not a readable video"),
     ({"video": "https://example.com/a.mp4"}, 400, "data: URL"),
     ({"policy": "just words"}, 400, "a policy is"),
     ({"policy": {"categories": {}}}, 400, "categories"),
     ({"policy": {"categories": {"": ""}}}, 400, "at least one category"),
     ({"window": 0}, 400, "window"),
     ({"model": "other"}, 404, "not served here"),
     ({"colour": "red"}, 400, "colour")],
)  # fmt: skip
def test_moderation_route_refuses_bad_requests_by_name(served, change, status, words):
    _, url = served
    body = {"model": "tiny", "video": _url(EXAMPLES / "screened.mp4", "video/mp4"), "policy": "red_x: a red X"}
    r = httpx.post(f"{url}/v1/moderations/video", json={**body, **change}, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] or words == r.json()["error"].get("param")


def test_a_video_part_brings_its_sound_track_when_asked(served):
    """`video_url: {url, use_audio: true}`: the sound is interleaved with the frames (the web page asks for it when
    the model hears); a video without a sound track is its frames."""
    llm, url = served

    def prompt_tokens(video: str, **extra) -> int:
        part = {"type": "video_url", "video_url": {"url": _url(EXAMPLES / video, "video/mp4"), **extra}}
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
            part, {"type": "text", "text": "What happens?"}]}]}  # fmt: skip
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    plain, sound = prompt_tokens("screened.mp4"), prompt_tokens("screened.mp4", use_audio=True)
    parts = [{"type": "video", "video": str(EXAMPLES / "screened.mp4"), "use_audio": True},
             {"type": "text", "text": "What happens?"}]  # fmt: skip
    assert sound == len(llm.processor.encode_chat([{"role": "user", "content": parts}])["input_ids"]) > plain
    assert prompt_tokens("moving.mp4", use_audio=True) == prompt_tokens("moving.mp4")  # no sound track to add
