"""The jobs' own routes (ernie45 extensions beside the OpenAI API), used by the web page and any HTTP client.

`POST /v1/documents/info`: what a file part will be — its kind, pages (PDF), sheets (xlsx) and the tokens it
takes — before it is sent.

`POST /v1/moderations/video`: a video and a policy in, one verdict per window out, streamed as each window is
judged — what `ernie45 moderate` prints.

The video is cut into windows in the media pool (a window at a time, so a long video is never held whole); each
window is an ordinary chat request through the server's scheduler, its answer forced into the policy's verdict
schema. A client that goes away stops the decoding and aborts the window being judged.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..jobs.moderate import Policy, parse_policy, summary, verdict, window_messages, windows
from .protocol import APIError, ChatRequest
from .streaming import collect


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categories: dict[str, str] = Field(min_length=1)
    instructions: str = ""


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    video: str  # a data: URL of the video file (its sound track is judged too)
    policy: PolicyBody | str  # or YAML / JSON text, as a policy file holds it
    window: float = Field(4.0, gt=0, le=60)
    stride: float | None = Field(None, gt=0, le=60)
    fps: float = Field(2.0, gt=0, le=10)
    max_tokens: int = Field(200, ge=16, le=1000)
    thumbnails: bool = True  # a small JPEG of each window's middle frame, for a timeline
    stream: bool = True


def _data(url: str, param: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise APIError(400, f"{param}: send the bytes as a data: URL (data:video/mp4;base64,...)", param=param)
    head, data = url.split(",", 1)
    try:
        return base64.b64decode(data, validate=True) if head.endswith(";base64") else data.encode()
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data: URL's base64 does not decode", param=param) from None


def _thumbnail(frames: list) -> str | None:
    if not frames:
        return None
    img = frames[len(frames) // 2].copy()
    img.thumbnail((96, 96))
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


class FileBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_data: str  # a data: URL
    filename: str | None = None


def _info(proc, f: FileBody) -> dict:
    from ..processing.documents import kind_of, sheets

    data = _data(f.file_data, "file_data")
    kind = kind_of(f.filename, data)
    out: dict = {"kind": kind, "bytes": len(data)}
    if kind == "pdf":
        import pypdfium2 as pdfium

        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as e:
            raise ValueError(f"{f.filename or 'file'}: not a readable PDF ({e})") from None
        out["pages"] = len(pdf)
        pdf.close()
    elif kind == "xlsx":
        out["sheets"] = len(sheets(data, f.filename or "book.xlsx"))
    part = {"type": "file", "file": {"file_data": f.file_data, "filename": f.filename}}
    out["tokens"] = len(proc.encode_chat([{"role": "user", "content": [part]}])["input_ids"])
    return out


def add_job_routes(app: FastAPI, srv) -> None:
    """Mount the routes on `app`, judging through `srv` (the chat routes' `Server`)."""

    @app.post("/v1/documents/info")
    async def document_info(body: FileBody):
        try:
            return await anyio.to_thread.run_sync(_info, srv.llm.processor, body, limiter=srv.media_limiter)
        except ValueError as e:
            raise APIError(422, f"cannot use this file: {e}", param="file_data", code="unsupported_media") from None

    @app.post("/v1/moderations/video")
    async def moderate_video(body: ModerationRequest, request: Request):
        srv.check_model(body.model)
        proc = srv.llm.processor
        if not proc.multimodal:
            raise APIError(400, "this model does not see pictures; moderation needs a VL or omni model",
                           param="model")  # fmt: skip
        try:
            if isinstance(body.policy, str):
                policy = parse_policy(body.policy)
            else:
                policy = Policy(dict(body.policy.categories), body.policy.instructions)
        except ValueError as e:  # no categories, an empty category name, unreadable YAML
            raise APIError(400, f"policy: {e}", param="policy") from None
        data = _data(body.video, "video")
        rate = proc.audio.config.sample_rate if proc.hears else 16000
        source = windows(io.BytesIO(data), body.window, body.stride, body.fps, rate, max_pixels=proc.video.max_pixels)
        params = ChatRequest(model=body.model, messages=[{"role": "user", "content": "-"}], temperature=0,
                             max_tokens=body.max_tokens, response_format={"type": "json_schema", "json_schema": {
                                 "name": "verdict", "schema": policy.schema()}})  # fmt: skip

        async def next_window():
            try:
                return await anyio.to_thread.run_sync(next, source, None, limiter=srv.media_limiter)
            except ValueError as e:
                raise APIError(422, f"video: {e}", param="video", code="unsupported_media") from None

        first = await next_window()  # an unreadable video is an error status, not a broken stream
        if first is None:
            raise APIError(422, "video: no frames or sound in it", param="video", code="unsupported_media")

        async def verdicts():
            began, w, done = time.perf_counter(), first, []
            while w is not None:
                encoded = await run_in_threadpool(proc.encode_chat, window_messages(w, policy, proc.hears, rate))
                handles = srv.submit([encoded], params, 1)
                try:
                    ((text, _),) = await collect(handles, request)
                finally:  # a stream closed mid-window gives its slot back (a no-op for a finished request)
                    for h in handles:
                        h.abort()
                v = verdict(w, text, time.perf_counter() - began)
                done.append(v)
                thumb = _thumbnail(w.frames) if body.thumbnails else None
                yield {"object": "moderation.window", **v, **({"thumbnail": thumb} if thumb else {})}
                w = await next_window()
            yield {"object": "moderation.summary", **summary(done, policy)}

        if not body.stream:
            items = [item async for item in verdicts()]
            return {"object": "moderation", "windows": items[:-1], "summary": items[-1]}

        async def stream():
            try:
                async for item in verdicts():
                    yield f"data: {json.dumps(item)}\n\n"
            except APIError as e:  # after the first window the status is sent: the error goes in the stream
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
