"""`ernie45 serve`: an OpenAI-compatible HTTP API (and a web chat page) over the continuous-batching engine.

Every request is validated before it reaches the engine; every failure is an OpenAI error object with a
status that says whose fault it was; a client that goes away aborts its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLM
from ..engine.batcher import BatchEngine, EngineStopped, QueueFull
from ..processing.media import Cancelled, cancellable
from ..processing.tools import finish_with_calls, parse_tool_calls
from .jobs import add_job_routes
from .logprobs import chat_logprobs, completion_logprobs
from .media import MediaPolicy
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, split_answer
from .streaming import chat_stream, collect, completion_stream, finish_reason, sse, usage

PAGE = Path(__file__).with_name("static") / "index.html"
log = logging.getLogger("ernie45.serve")


class Server:
    """What the routes share: the engine, the served name, the key and the media policy."""

    def __init__(self, llm: LLM, engine: BatchEngine, name: str, api_key: str | None, media: MediaPolicy) -> None:
        self.llm, self.engine, self.name, self.api_key, self.media = llm, engine, name, api_key, media
        self.metrics = Metrics()
        # no token is longer than this many characters, so a text over max_len x this cannot fit: it is refused
        # before the tokenizer runs (which takes ~170x a text's size in memory)
        self.longest_token = max(len(t) for t in llm.processor.tokenizer.get_vocab())

    def check_texts(self, texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context, or is not valid Unicode, before anything is tokenized."""
        chars = sum(len(t) for t in texts)
        if chars > self.engine.max_len * self.longest_token:
            raise APIError(400, f"the input has {chars:,} characters: more than the {self.engine.max_len}-token "
                                f"context can hold", param=param, code="context_length_exceeded")  # fmt: skip
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"the text is not valid Unicode ({e.reason} at character {e.start})",
                               param=param) from None  # fmt: skip

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists {self.name!r}",
                           type="not_found_error", param="model", code="model_not_found")  # fmt: skip

    async def encode_chat(self, body: ChatRequest, request: Request | None = None) -> dict[str, Any]:
        """The conversation encoded; media are decoded in the bounded pool, and stop when the client leaves."""
        conversation = body.conversation()
        self.check_texts(list(_texts(conversation)), "messages")
        messages = await self.media.resolve(conversation)
        kwargs = body.chat_template_kwargs or {}
        has_media = any(isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"])
                        for m in messages)  # fmt: skip
        try:
            encode = functools.partial(self.llm.processor.encode_chat, messages, tools=body._tools, **kwargs)
            if not has_media:
                return await run_in_threadpool(encode)
            encoded = await self._decode_media(encode, request)
            files = any(p.get("type") == "file" for m in messages if isinstance(m.get("content"), list)
                        for p in m["content"])  # fmt: skip
            return {**encoded, "documents": True} if files else encoded
        except APIError:
            raise
        except (ValueError, OSError, TypeError) as e:  # undecodable media, a template that refuses the turns
            raise APIError(422, f"cannot use this input: {self.media.public(str(e))}", param="messages",
                           code="unsupported_media") from None  # fmt: skip

    async def _decode_media(self, encode, request: Request | None) -> dict[str, Any]:
        """Run `encode` in the media pool (where a request's memory goes), cancelling it if the client leaves."""
        stop = threading.Event()

        def run() -> dict[str, Any]:
            with cancellable(stop):
                return encode()

        work = asyncio.ensure_future(anyio.to_thread.run_sync(run, limiter=self.media_limiter))
        while not work.done():
            await asyncio.wait([work], timeout=0.25)
            if not work.done() and request is not None and await request.is_disconnected():
                stop.set()  # the decoding thread stops at its next frame or page
                with contextlib.suppress(Cancelled):
                    await work
                self.metrics.media_cancelled += 1
                raise APIError(499, "client closed the request")
        return work.result()

    def encode_prompt(self, prompt: str | list[int]) -> dict[str, Any]:
        if isinstance(prompt, str):
            return self.llm.processor.encode(prompt)
        vocab = self.llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return {"input_ids": list(prompt)}

    def decode_one(self, token: int) -> str:
        return self.llm.processor.tokenizer.decode([token], skip_special_tokens=False)

    def completion_choice(self, index: int, text: str, reason: str | None, handle, body: CompletionRequest) -> dict:
        """A whole completions choice: with echo the prompt's text (and its tokens' log-probabilities) first."""
        row, prompt_ids = handle.request.row, handle.request.encoded["input_ids"]
        prefix = self.llm.processor.decode(prompt_ids) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            ids, entries = list(row.token_ids), list(row.logprobs or [])
            if body.echo:
                ids, entries = list(prompt_ids) + ids, list(row.prompt_logprobs or [None] * len(prompt_ids)) + entries
            logprobs = completion_logprobs(entries, ids, body.logprobs, self.decode_one)
        return {"index": index, "text": prefix + text, "finish_reason": finish_reason(reason), "logprobs": logprobs}

    def submit(self, encoded: list[dict[str, Any]], body, n: int) -> list:
        """Every prompt with its n choices, admitted together or not at all: a refusal leaves no work behind."""
        items = []
        for e in encoded:
            tokens = len(e["input_ids"])
            if tokens == 0:
                raise APIError(400, "the prompt is empty: it has no tokens", param="prompt")
            room = self.engine.max_len - tokens - 1
            if room < 1:
                hint = "; a document's pages take text and image tokens: send fewer pages" if e.get("documents") else ""
                raise APIError(400, f"the prompt has {tokens} tokens; this server holds {self.engine.max_len} per "
                                    f"request{hint}", param="messages", code="context_length_exceeded")  # fmt: skip
            if body.limit is not None and body.limit > room:
                raise APIError(400, f"max_tokens {body.limit} + the prompt's {tokens} tokens exceed the "
                                    f"{self.engine.max_len}-token context; ask for at most {room}",
                               param="max_tokens", code="context_length_exceeded")  # fmt: skip
            limit = body.limit if body.limit is not None else min(self.llm.default_sampling.max_tokens, room)
            items += [(e, body.sampling(self.llm.default_sampling, limit, i)) for i in range(n)]
        vocab = self.llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in (body.logit_bias and map(int, body.logit_bias)) or ()):
            raise APIError(400, f"logit_bias: token ids must lie in [0, {vocab})", param="logit_bias")
        try:
            return self.engine.submit_all(items, loop=asyncio.get_running_loop())
        except ValueError as e:  # a schema or grammar the matcher cannot build
            raise APIError(400, str(e), param="response_format") from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error") from None
        except EngineStopped as e:
            raise APIError(503, f"the engine is not available: {e}", type="server_error") from None


def _texts(messages: list[dict[str, Any]]):
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if p.get("type") == "text")


def create_app(llm: LLM, *, name: str = "ernie45", api_key: str | None = None, media: MediaPolicy | None = None,
               max_batch: int = 16, max_len: int | None = 4096, max_waiting: int = 256,
               max_body_bytes: int = 64 << 20, engine_thread: bool = True, max_slots_per_request: int | None = None,
               max_image_pixels: int = 16_000_000, max_video_frames: int | None = None,
               media_workers: int = 2, max_document_pages: int = 100) -> FastAPI:  # fmt: skip
    """engine_thread False: the engine does not start its own thread; the caller runs `app.state.engine.run()`
    (on the thread that loaded the model: see `BatchEngine`). max_slots_per_request: slots one request's prompts
    and choices hold at a time (default half of max_batch). Media: images and video frames over max_image_pixels
    are refused from their header; a video is fitted to the context (frames x pixels) before it is decoded; at
    most `media_workers` requests decode media at once."""
    engine = BatchEngine(llm, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting, thread=engine_thread,
                         group_share=max_slots_per_request, decoder=llm.decoder,
                         speculative=getattr(llm, "speculative", None))  # fmt: skip
    proc = llm.processor
    proc.image.max_input_pixels = proc.video.max_input_pixels = max_image_pixels
    proc.max_document_pages = max_document_pages
    if max_video_frames is not None:
        proc.video.max_frames = max_video_frames
    unit = proc.video.image.patch_size * proc.video.image.merge_size
    proc.video.max_total_pixels = engine.max_len * unit * unit * proc.video.temporal_merge_size  # pixels per token
    srv = Server(llm, engine, name, api_key, media or MediaPolicy())
    srv.media_limiter = anyio.CapacityLimiter(media_workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="ernie45", version="1", description="OpenAI-compatible API for ERNIE 4.5 models",
                  lifespan=lifespan)  # fmt: skip
    app.state.server = srv
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    app.add_middleware(Guard, api_key=api_key, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(APIError(e.status_code, what.get(e.status_code, str(e.detail)), type=kind))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return _error(APIError(400, f"the body is not valid JSON ({errors[0].get('msg', '')})"))
        # a union (content: str | list of parts) fails in every branch; the deepest failure is the one meant
        first = max(errors, key=lambda err: len(err.get("loc", ())), default={})
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x))
        msg = first.get("msg", "bad request")
        return _error(APIError(400, f"{where}: {msg}" if where else msg, param=where or None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        incident = uuid.uuid4().hex[:12]  # the details (paths, a traceback) go to the server's log, not the client
        log.error("internal error %s on %s", incident, request.url.path, exc_info=e)
        return _error(APIError(500, f"internal error ({type(e).__name__}); the server log has the details under "
                                    f"incident {incident}", type="server_error"))  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        hears = "1" if llm.processor.hears else ""  # the page sends a video's sound only to a model that hears
        return HTMLResponse(PAGE.read_text().replace("{{MODEL}}", name).replace("{{HEARS}}", hears))

    app.mount("/static", StaticFiles(directory=PAGE.parent), name="static")  # the page's scripts, nothing fetched
    add_job_routes(app, srv)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is down", type="server_error")
        return {"status": "ok", **engine.usage()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(srv.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ernie45",
                                            "max_model_len": engine.max_len}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        srv.check_model(body.model)
        encoded = await srv.encode_chat(body, request)
        handles = srv.submit([encoded], body, body.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if body.stream:
            return sse(chat_stream(handles, body, head), handles)
        texts = await collect(handles, request)
        choices = []
        for i, ((text, reason), h) in enumerate(zip(texts, handles, strict=True)):
            reasoning, content = split_answer(text, body.thinking)
            msg = {"role": "assistant", "content": content}
            if body.parses_calls:
                content, calls = parse_tool_calls(content, body._tools)
                if calls:
                    msg.update(content=content or None, tool_calls=calls)
                    reason = finish_with_calls(reason)
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            row = h.request.row
            logprobs = None if row.logprobs is None else chat_logprobs(row.logprobs, row.token_ids,
                                                                        body.top_logprobs or 0)  # fmt: skip
            choices.append({"index": i, "message": msg, "finish_reason": finish_reason(reason), "logprobs": logprobs})
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(handles)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = body.prompts()
        srv.check_texts([p for p in prompts if isinstance(p, str)], "prompt")
        encoded = [await run_in_threadpool(srv.encode_prompt, p) for p in prompts]
        handles = srv.submit(encoded, body, body.n)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            if body.echo:
                raise APIError(400, "echo is not available with stream; ask without stream", param="echo")
            return sse(completion_stream(handles, body, head, srv.decode_one), handles)
        texts = await collect(handles, request)
        choices = [
            srv.completion_choice(i, t, r, h, body) for i, ((t, r), h) in enumerate(zip(texts, handles, strict=True))
        ]
        return {**head, "object": "text_completion", "choices": choices, "usage": usage(handles)}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        srv.check_model(model_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "ernie45", "max_model_len": engine.max_len}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            srv.check_model(body.model)
        if body.prompt is not None:
            srv.check_texts([body.prompt], "prompt")
            ids = (await run_in_threadpool(srv.llm.processor.encode, body.prompt))["input_ids"]
        else:
            chat = ChatRequest(model=name, messages=body.messages)
            ids = (await srv.encode_chat(chat))["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            srv.check_model(body.model)
        vocab = srv.llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": srv.llm.processor.decode(body.tokens)}

    return app


class Guard:
    """ASGI: the API key on /v1/ routes, and each request's route, status and latency into the metrics. A plain
    ASGI middleware, not Starlette's BaseHTTPMiddleware, whose wrapped `receive` hid a client's disconnect from
    the routes (so a request whose client had left ran to its end)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, route = time.perf_counter(), scope["path"]
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        try:
            if route.startswith("/v1/") and self.api_key and auth != f"Bearer {self.api_key}":
                refusal = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                   type="authentication_error", code="invalid_api_key")  # fmt: skip
                await _error(refusal)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(route if route in KNOWN else "other", status[0], time.perf_counter() - start)


class BodyLimit:
    """ASGI: read the body first and refuse one over `limit` bytes with 413 (Content-Length or chunked)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        too_big = _error(APIError(413, f"the body is larger than this server's limit of {self.limit} bytes"))
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect when the client goes away

        await self.app(scope, replay, send)


KNOWN = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/moderations/video",
    "/v1/documents/info",
}


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
