"""Answers as they come: whole answers collected (aborted if the client leaves), n answers' deltas merged, and
the server-sent-event streams of chat and completions chunks (text, reasoning, log-probabilities, usage)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import Delta
from ..processing.tools import CallStream, finish_with_calls
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import APIError, ChatRequest, CompletionRequest, ReasoningSplit


def finish_reason(reason: str | None) -> str:
    return "stop" if reason in (None, "abort") else reason


def usage(handles) -> dict[str, int]:
    prompt = sum({id(h.request.encoded): h.prompt_tokens for h in handles}.values())  # each prompt once, not n times
    completion = sum(len(h.request.row.token_ids) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(handles, request: Request) -> list[tuple[str, str | None]]:
    """Whole answers; if the client goes away first, every request is aborted."""

    async def one(h):
        text, reason = [], None
        async for d in h:
            text.append(d.text)
            reason = d.finish_reason or reason
        return "".join(text), reason

    work = asyncio.ensure_future(asyncio.gather(*(one(h) for h in handles)))
    while not work.done():
        await asyncio.wait([work], timeout=0.5)
        if not work.done() and await request.is_disconnected():
            for h in handles:
                h.abort()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise APIError(499, "client closed the request")
    return work.result()


async def _merged(handles) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of n requests as they come, tagged with their choice index."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            async for d in h:
                await q.put((i, d))
        except Exception as e:  # the engine failed this request: end its choice with an error
            await q.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            i, d = await q.get()
            if isinstance(d, Exception):
                left -= 1
                yield i, Delta("", [], "error")
                continue
            left -= bool(d.finish_reason)
            yield i, d
    finally:
        for t in tasks:
            t.cancel()


async def chat_stream(handles, body: ChatRequest, head: dict) -> AsyncIterator[dict]:
    splits = [ReasoningSplit(body.thinking) for _ in handles]
    for i in range(len(handles)):
        yield {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
    calls = [CallStream(body._tools) if body.parses_calls else None for _ in handles]
    made = [0] * len(handles)  # tool calls sent per choice (their `index`)
    async for i, d in _merged(handles):
        final = d.finish_reason is not None
        reasoning, content = splits[i].feed(d.text, final=final)
        delta: dict = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls[i] is not None:
            content, new = calls[i].feed(content, final=final)
            if new:
                delta["tool_calls"] = [{"index": made[i] + k, **c} for k, c in enumerate(new)]
                made[i] += len(new)
        if content:
            delta["content"] = content
        logprobs = chat_logprobs(d.logprobs, d.token_ids, body.top_logprobs or 0) if d.logprobs else None
        if delta or d.finish_reason or logprobs:
            finish = finish_reason(d.finish_reason) if d.finish_reason else None
            if finish and made[i]:
                finish = finish_with_calls(finish)
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            yield {**head, "object": "chat.completion.chunk", "choices": [choice]}
    if body.include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(handles)}


async def completion_stream(handles, body: CompletionRequest, head: dict, decode) -> AsyncIterator[dict]:
    async for i, d in _merged(handles):
        logprobs = None
        if d.logprobs and body.logprobs is not None:
            logprobs = completion_logprobs(d.logprobs, d.token_ids, body.logprobs, decode)
        if d.text or d.finish_reason or logprobs:
            finish = finish_reason(d.finish_reason) if d.finish_reason else None
            yield {
                **head,
                "object": "text_completion",
                "choices": [{"index": i, "text": d.text, "finish_reason": finish, "logprobs": logprobs}],
            }
    if body.include_usage:
        yield {**head, "object": "text_completion", "choices": [], "usage": usage(handles)}


def sse(chunks: AsyncIterator[dict], handles) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that disconnects lands here: its requests give their slots back now
            for h in handles:
                h.abort()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
