"""A request's life in the continuous-batching engine: what it asked (`Request`), what its caller holds
(`RequestHandle`: the deltas, sync or async, and `abort`), and the errors a caller can get."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .llm import Delta, RowState
from .sampling import SamplingParams
from .structured import Constraint

if TYPE_CHECKING:
    from .batcher import BatchEngine


def has_media(encoded: dict[str, Any]) -> bool:
    return any(k not in ("input_ids", "attention_mask") for k in encoded)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class QueueFull(RuntimeError):
    """More requests wait than the engine was told to hold (`max_waiting`)."""


class RequestFailed(RuntimeError):
    """This request could not be completed (the engine goes on with the others)."""


class EngineStopped(RuntimeError):
    """The engine is shut down (or its worker died); no request is taken."""


@dataclass
class Request:
    id: int
    encoded: dict[str, Any]
    params: SamplingParams
    row: RowState
    out: Any  # queue.Queue or (loop, asyncio.Queue)
    group: int = 0  # the requests submitted together (one HTTP request's prompts and n choices) share a group
    slot: int = -1
    done_prompt: int = 0  # prompt tokens already in the cache
    last_token: int = 0
    aborted: bool = False
    finished: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # structured outputs: the grammar's matcher for this answer
    speculation: list[int] = field(default_factory=lambda: [0, 0])  # [steps to skip drafting, misses in a row]
    mtp: tuple | None = None  # MTP drafting: (its cache, the next step's draft, the first position it lacks)
    mtp_seed: tuple | None = None  # (the trunk's hidden states [1, n, H] before the final norm, the position after)
    unspeculated: str | None = None  # why this request decoded without drafts, where speculation is on

    @property
    def prompt_len(self) -> int:
        return len(self.encoded["input_ids"])

    def emit(self, item: Delta | BaseException) -> None:
        if isinstance(self.out, queue.Queue):
            self.out.put(item)
        else:
            loop, q = self.out
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: nobody is listening any more
                self.aborted = True


class RequestHandle:
    """What `submit` returns: iterate (sync) or `async for` over the deltas; `abort()` frees the slot."""

    def __init__(self, engine: BatchEngine, request: Request) -> None:
        self.engine, self.request = engine, request

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_len

    def abort(self) -> None:
        self.request.aborted = True
        self.engine._wake()

    def __iter__(self):
        q = self.request.out
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return

    async def __aiter__(self):
        _, q = self.request.out
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
