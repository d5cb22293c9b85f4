"""Continuous batching: requests join and leave the running batch between decode steps.

One worker thread owns the model. Each step it (1) frees the slots of finished or aborted requests,
(2) admits waiting requests into free cache slots, (3) prefills admitted prompts in chunks of at most
`prefill_chunk` tokens per step (a prompt with media in one piece), so a long prompt does not stall the
others, and (4) decodes one token for every request that is past its prefill, in one batched forward.
Requests talk to callers through a queue of `Delta`s (thread-safe; asyncio callers pass their loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Any

import torch

from .compiled import CompiledDecoder
from .llm import LLM, Delta
from .requests import EngineStopped, QueueFull, Request, RequestFailed, RequestHandle, common_prefix, has_media
from .sampling import SamplingParams, apply_penalties, position_logprobs, sample
from .slots import SlotKVCache
from .speculative import MTP_WINDOW, SpeculativeConfig, speculate, why_not
from .structured import Constraint

log = logging.getLogger("ernie45.engine")
MIN_PREFIX = 16  # shorter shared prefixes are cheaper to recompute than to look up and copy
SCORED_CHUNK = 256  # prompt positions a chunk computes logits for when the prompt is scored (V floats each)


class BatchEngine:
    """Continuous batching over one `LLM`'s model: `submit` from any thread, one worker runs the steps."""

    def __init__(self, llm: LLM, *, max_batch: int = 16, max_len: int | None = None, prefill_chunk: int = 256,
                 max_waiting: int = 256, thread: bool = True, raise_errors: bool = False,
                 group_share: int | None = None, decoder: CompiledDecoder | None = None,
                 speculative: SpeculativeConfig | None = None) -> None:  # fmt: skip
        """thread: run the steps on a worker thread of its own; False: the creating thread runs `run()` (or calls
        `step()` itself). raise_errors: a failing step raises (`LLM`'s own use) instead of failing its requests
        and serving the others (a server's). decoder: decode steps through this compiled fixed-shape step (its slot
        cache, every slot each step) instead of eagerly. speculative: draft tokens by prompt lookup and verify
        them in one forward (`speculative.py`).

        Run the steps on the thread that loaded the model where you can (`ernie45 serve` does): OpenMP keeps one
        thread pool per thread that starts parallel work, and with two pools on a small machine libgomp stops
        spinning between parallel regions, so every one of a decode step's ~100 regions pays a wake-up (a
        fifth of the 0.3B's bf16 decode speed: docs/performance.md)."""
        self.llm, self.model, self.raise_errors = llm, llm.model, raise_errors
        limit = self.model.config.max_position_embeddings
        self.max_len = min(max_len or limit, limit)
        self.decoder = decoder
        self.speculative = speculative
        if speculative is not None and speculative.method == "mtp" and not self.model.config.num_nextn_predict_layers:
            raise ValueError("speculative_config method 'mtp': this model has no MTP block (its checkpoint has no "
                             "mtp_* weights); use method 'ngram'")  # fmt: skip
        if decoder is None:
            self.cache = SlotKVCache.for_model(self.model, max_batch, self.max_len)
        else:  # a kept cache of the decoder's (bucketed length): the compiled graph is reused across engines
            self.cache = decoder.cache(max_batch, self.max_len)
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self.group_share = group_share or max(1, max_batch // 2)  # slots one group may hold at a time
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.slots: list[Request | None] = [None] * max_batch
        self.slot_tokens: list[list[int] | None] = [None] * max_batch  # ids whose K/V a slot holds (text only)
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "failed": 0, "prompt_tokens": 0,
                      "completion_tokens": 0, "steps": 0, "latency_sum": 0.0, "ttft_sum": 0.0,
                      "prefix_cached_tokens": 0, "draft_tokens": 0, "accepted_tokens": 0,
                      "unspeculated_requests": 0}  # fmt: skip
        if thread:
            self._thread = threading.Thread(target=self._loop, name="ernie45-engine", daemon=True)
            self._thread.start()
        else:  # the creating thread steps it: `run()`, or `step()` by hand
            self._thread = threading.current_thread()

    def run(self) -> None:
        """Run the steps on the calling thread until `shutdown` (for `thread=False`)."""
        self._loop()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stop and self._thread.is_alive()

    # ---- callers ------------------------------------------------------------------------------------------
    def submit(self, encoded: dict[str, Any], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None):
        """Queue an encoded prompt; returns a handle to read its deltas from (async when `loop` is given)."""
        return self.submit_all([(encoded, params)], loop)[0]

    def submit_all(self, items: list[tuple[dict[str, Any], SamplingParams]],
                   loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:  # fmt: skip
        """Queue prompts as one group, all or none: every one is checked, and the queue must have room for all,
        before any is queued (a refused group leaves no work behind). A group holds at most `group_share` slots
        at a time."""
        if not self.alive:
            raise EngineStopped("the engine is not running" + (f": {self.error}" if self.error else ""))
        for encoded, _ in items:
            n = len(encoded["input_ids"])
            if n == 0:
                raise ValueError("the prompt is empty (no tokens)")
            if n + 1 > self.max_len:
                raise ValueError(f"the prompt has {n} tokens; this engine holds {self.max_len} per request")
        vocab = self.model.config.vocab_size
        for _, params in items:
            if any(not 0 <= t < vocab for t in params.logit_bias or ()):
                raise ValueError(f"logit_bias: token ids must lie in [0, {vocab})")
        group = next(self._ids)
        reqs = []
        for encoded, params in items:
            out = queue.Queue() if loop is None else (loop, asyncio.Queue())
            row = self.llm.row_state(params, len(encoded["input_ids"]))
            constraint = None
            if params.structured_outputs is not None:  # a bad schema or grammar is the caller's ValueError, here
                constraint = Constraint(params.structured_outputs, self.llm.processor.tokenizer)
            reqs.append(Request(next(self._ids), encoded, params, row, out, group=group, constraint=constraint))
        with self._cv:
            if len(self.waiting) + len(reqs) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; {len(reqs)} more do not fit "
                                f"the queue of {self.max_waiting}")  # fmt: skip
            self.waiting.extend(reqs)
            self.stats["requests"] += len(reqs)
            self._cv.notify()
        return [RequestHandle(self, r) for r in reqs]

    def usage(self) -> dict[str, int]:
        """Queue depth and cache use right now."""
        used = [r for r in self.slots if r is not None]
        return {"waiting": len(self.waiting), "running": len(used), "slots": len(self.slots),
                "cache_tokens": int(sum(self.cache.lengths[r.slot] for r in used)),
                "cache_capacity": len(self.slots) * self.max_len}  # fmt: skip

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not (self.waiting or self.prefilling or self.running):
                        self._cv.wait()
                    if self._stop:
                        break
                self.step()
        except BaseException as e:  # a broken model must not leave callers waiting forever
            self.error = e
            for r in [*self.waiting, *self.prefilling, *self.running]:
                r.emit(e)
        finally:
            for r in [*self.waiting, *self.prefilling, *self.running]:
                r.emit(EngineStopped("the engine stopped"))

    @torch.inference_mode()
    def step(self) -> None:
        self._release()
        self._admit()
        budget = self.prefill_chunk
        fresh = self._fresh_group(budget)
        if fresh:
            try:
                budget -= self._prefill_together(fresh)
            except Exception as e:
                self._failed(fresh, e)
        for req in list(self.prefilling):
            if budget <= 0:
                break
            try:
                budget -= self._prefill(req, budget)
            except Exception as e:  # one bad request fails alone; the engine serves the others
                self._failed([req], e)
        self._release()  # a request that finished at its first token takes no decode step
        if self.running:
            try:
                self._decode()
            except Exception as e:
                self._failed(list(self.running), e)
        self._release()  # finished requests give their slots back before anyone looks
        self.stats["steps"] += 1

    def _release(self) -> None:
        for group in (self.prefilling, self.running):
            for req in [r for r in group if r.aborted or r.finished]:
                group.remove(req)
                self._free(req)
        with self._cv:
            for req in [r for r in self.waiting if r.aborted]:
                self.waiting.remove(req)
                self._finish_aborted(req)

    def _free(self, req: Request) -> None:
        self.slots[req.slot] = None
        self.cache.reset(req.slot)
        if req.aborted and not req.finished:
            self._finish_aborted(req)

    def _failed(self, reqs: list[Request], error: Exception) -> None:
        if self.raise_errors:
            raise error
        self._fail(reqs, error)

    def _fail(self, reqs: list[Request], error: Exception) -> None:
        for req in reqs:
            if not req.finished:
                req.finished = True
                self.stats["failed"] += 1
                req.emit(RequestFailed(f"generation failed: {type(error).__name__}: {error}"))

    def _finish_aborted(self, req: Request) -> None:
        req.finished = True
        self.stats["aborted"] += 1
        req.emit(Delta("", [], "abort"))

    def _next_waiting(self) -> Request | None:
        """The first waiting request whose group holds fewer than `group_share` slots, or None: one request with
        n=16 cannot take every slot, so a request that comes after it starts at once."""
        held: dict[int, int] = {}
        for r in self.slots:
            if r is not None:
                held[r.group] = held.get(r.group, 0) + 1
        for req in self.waiting:
            if held.get(req.group, 0) < self.group_share:
                self.waiting.remove(req)
                return req
        return None

    def _admit(self) -> None:
        with self._cv:
            while self.waiting and None in self.slots:
                req = self._next_waiting()
                if req is None:
                    break
                try:
                    req.slot = self._place(req)
                    self.slots[req.slot] = req
                    vocab, dev = self.model.config.vocab_size, self.model.device
                    ids = torch.tensor(req.encoded["input_ids"], dtype=torch.long, device=dev).clamp(0, vocab - 1)
                    req.seen = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
                    req.seen[0, ids] = True
                    req.counts = torch.zeros(1, vocab, dtype=torch.long, device=dev)
                    if req.params.seed is not None:
                        req.generator = torch.Generator(dev).manual_seed(req.params.seed)
                    self.prefilling.append(req)
                except Exception as e:
                    if req.slot >= 0:
                        self.slots[req.slot] = None
                    self._fail([req], e)

    def _place(self, req: Request) -> int:
        """A free slot for `req`, starting from the longest cached prefix of its prompt that any slot holds.

        Slots keep their tokens after their request ends, so a follow-up turn of a chat (whose prompt is the
        last prompt plus the answer) starts where the last one stopped. Prompts with media never share.
        """
        free = [i for i, r in enumerate(self.slots) if r is None]
        ids = req.encoded["input_ids"]
        text = not has_media(req.encoded)
        scored = req.params.prompt_logprobs is not None  # every prompt position's logits are computed
        src, reuse = None, 0
        for i, held in enumerate(self.slot_tokens if text and not scored else []):
            if held:
                n = min(common_prefix(held, ids), len(ids) - 1)  # one prompt token is computed, for its logits
                if n >= MIN_PREFIX and (n > reuse or (n == reuse and i in free)):
                    src, reuse = i, n
        if src is not None and src in free:
            slot = src
            self.cache.lengths[slot] = reuse
        else:
            slot = min(free, key=lambda i: self.slot_tokens[i] is not None)  # an empty slot first
            if src is not None:
                self.cache.copy_prefix(src, slot, reuse)
            else:
                self.cache.reset(slot)
        self.slot_tokens[slot] = list(ids[:reuse]) if text else None
        req.done_prompt = reuse
        self.stats["prefix_cached_tokens"] += reuse
        return slot

    def _prefill(self, req: Request, budget: int) -> int:
        """Feed the next chunk of `req`'s prompt into its slot; on the last chunk, sample its first token."""
        enc, dev = req.encoded, self.model.device
        media = has_media(enc)
        start = req.done_prompt
        end = req.prompt_len if media else min(req.prompt_len, start + max(budget, 1))
        scored = req.params.prompt_logprobs is not None
        if scored and not media:
            end = min(end, start + SCORED_CHUNK)
        ids = torch.tensor([enc["input_ids"][start:end]], device=dev)
        view = self.cache.slot(req.slot)
        kwargs: dict[str, Any] = {}
        if media:
            batch = self.llm.processor.collate([enc])
            kwargs = {k: v.to(dev) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        if start:
            kwargs["attention_mask"] = torch.ones(1, end, dtype=torch.long, device=dev)
        seeds = self._seeds_mtp(req, media, scored)  # the trunk's last hidden states kept for the MTP block's cache
        out = self.model(input_ids=ids, cache=view, logits_to_keep=0 if scored else 1, output_trunk_hidden=seeds,
                         **kwargs)  # fmt: skip
        logits = out.logits
        if seeds:
            kept = out.trunk_hidden
            if req.mtp_seed is not None and req.mtp_seed[1] == start:
                kept = torch.cat([req.mtp_seed[0], kept], dim=1)
            req.mtp_seed = (kept[:, -MTP_WINDOW:], end)
        if scored:
            self._score(req, start, end, logits[0])
        self._prefilled(req, start, end, logits[:, -1])
        return end - start

    def _seeds_mtp(self, req: Request, media: bool, scored: bool) -> bool:
        """Whether this prompt's prefill keeps the trunk's hidden states of its last positions, which MTP drafting's
        first step would otherwise recompute (a second forward over up to `MTP_WINDOW` positions)."""
        spec = self.speculative
        return spec is not None and spec.method == "mtp" and not media and not scored and why_not(req) is None

    def _score(self, req: Request, start: int, end: int, logits: torch.Tensor) -> None:
        """The log-probabilities of prompt tokens start+1..end (position p's logits predict token p + 1)."""
        ids, row = req.encoded["input_ids"], req.row
        if row.prompt_logprobs is None:
            row.prompt_logprobs = [None]
        decode = self._decode_one
        for j in range(end - start):
            if start + j + 1 < req.prompt_len:
                row.prompt_logprobs.append(position_logprobs(logits[j], ids[start + j + 1],
                                                             req.params.prompt_logprobs, decode))  # fmt: skip

    def _decode_one(self, token: int) -> str:
        return self.llm.processor.tokenizer.decode([token], skip_special_tokens=False)

    def _prefilled(self, req: Request, start: int, end: int, logits: torch.Tensor) -> None:
        """Prompt tokens start..end of `req` are in its slot; after the last, `logits` give its first token."""
        req.done_prompt = end
        if self.slot_tokens[req.slot] is not None:
            self.slot_tokens[req.slot].extend(req.encoded["input_ids"][start:end])
        if end == req.prompt_len:
            self.prefilling.remove(req)
            self.running.append(req)
            self.stats["prompt_tokens"] += req.prompt_len
            if req.params.max_tokens == 0:  # scoring only: no answer token
                req.row.finish_reason = "length"
                self._done(req, "", [])
            else:
                self._take(req, logits)

    def _fresh_group(self, budget: int) -> list[Request]:
        """Text prompts that start from an empty slot and fit the budget together (two or more): one forward
        prefills them all instead of one forward each."""
        group, total = [], 0
        for req in self.prefilling:
            if req.done_prompt or has_media(req.encoded) or req.finished or req.params.prompt_logprobs is not None:
                continue
            if total + req.prompt_len > budget:
                break
            group.append(req)
            total += req.prompt_len
        return group if len(group) > 1 else []

    def _prefill_together(self, reqs: list[Request]) -> int:
        """Prefill `reqs` (fresh text prompts) as one right-padded batch; sample each one's first token."""
        dev = self.model.device
        lengths = [r.prompt_len for r in reqs]
        ids = torch.full((len(reqs), max(lengths)), self.llm.processor.pad_id, dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            ids[i, : lengths[i]] = torch.tensor(r.encoded["input_ids"], dtype=torch.long, device=dev)
        view = self.cache.fresh([r.slot for r in reqs], lengths)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        logits = self.model(input_ids=ids, cache=view, logits_to_keep=last).logits[:, -1]
        for i, req in enumerate(reqs):
            self._prefilled(req, 0, req.prompt_len, logits[i : i + 1])
        return sum(lengths)

    def _decode(self) -> None:
        rows = self.running
        if self.speculative is not None:
            rows = [r for r in rows if not self._speculated(r)]
            if not rows:
                return
        n = len(self.slots) if self.decoder is not None else max(r.slot for r in rows) + 1
        dev = self.model.device
        tokens = torch.zeros(n, 1, dtype=torch.long, device=dev)
        active = torch.zeros(n, dtype=torch.bool)
        for r in rows:
            tokens[r.slot, 0] = r.last_token
            active[r.slot] = True
            if self.slot_tokens[r.slot] is not None:
                self.slot_tokens[r.slot].append(r.last_token)
        if self.decoder is not None:
            out = self.decoder.step(self.cache, tokens, active)
        else:
            view = self.cache.decode(n, active)
            text_type = torch.zeros(n, 1, dtype=torch.long, device=dev)
            out = self.model(input_ids=tokens, attention_mask=view.mask, position_ids=view.positions, cache=view,
                             moe_mm_token_type_ids=text_type).logits[:, -1]  # fmt: skip
        for r in list(rows):
            try:
                self._take(r, out[r.slot : r.slot + 1])
            except Exception as e:
                self._fail([r], e)

    def _speculated(self, req: Request) -> bool:
        """Whether `req` took a verified speculative step (a failure fails it alone, as a decode step would)."""
        reason = why_not(req)
        if reason is not None:
            if req.unspeculated is None:  # said once per request: the engine log and the metrics count it
                req.unspeculated = reason
                self.stats["unspeculated_requests"] += 1
                log.info("request %d decodes without speculation (%s)", req.id, reason)
            return False
        try:
            return speculate(self, req, self.speculative)
        except Exception as e:
            self._failed([req], e)
            return True

    def _take(self, req: Request, logits: torch.Tensor) -> None:
        p, row = req.params, req.row
        raw = logits
        if p.logit_bias or (p.min_tokens and len(row.token_ids) < p.min_tokens):
            logits = logits.float().clone()
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                logits[0, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if p.min_tokens and len(row.token_ids) < p.min_tokens:  # no end yet
                ends = {*p.stop_token_ids, *(() if p.ignore_eos else row.eos)}
                logits[0, [t for t in ends if t < logits.shape[-1]]] = float("-inf")
        if p.penalised or not p.greedy:  # greedy without penalties: the argmax of the logits as they are
            logits = apply_penalties(logits.float(), req.seen, req.counts, p)
        if req.constraint is not None:
            logits = req.constraint.mask(logits)
        self._push(req, int(sample(logits, p, req.generator)[0]), raw)

    def _push(self, req: Request, tok: int, raw: torch.Tensor | None) -> None:
        """One chosen token into the request: grammar, penalties' counts, text, logprobs, stop and length."""
        p, row = req.params, req.row
        req.last_token = tok
        if req.constraint is not None:
            req.constraint.advance(tok)
        if p.penalised:  # (the bookkeeping costs a few small ops a step; only penalties read it)
            req.seen[0, min(tok, req.seen.shape[1] - 1)] = True
            req.counts[0, min(tok, req.counts.shape[1] - 1)] += 1
        if req.first_token is None:
            req.first_token = time.perf_counter()
            self.stats["ttft_sum"] += req.first_token - req.arrival
        before = len(row.token_ids)
        text = row.push(tok)
        ids = row.token_ids[before:]
        if ids and row.logprobs is not None and raw is not None:
            row.logprobs.append(position_logprobs(raw[0], tok, p.logprobs, self._decode_one))
        room = self.cache.lengths[req.slot] + 1 < self.max_len
        if row.finish_reason is None and not room:
            row.finish_reason = "length"
            text += row.detok.flush()
        if row.finish_reason is None and req.constraint is not None and req.constraint.done:
            row.finish_reason = "stop"  # the grammar has ended: nothing else may follow
            text += row.detok.flush()
        self._done(req, text, ids)

    def _done(self, req: Request, text: str, ids: list[int]) -> None:
        """Emit what this step released; a finished request is counted (its slot is freed by `_release`)."""
        row = req.row
        if row.finish_reason is not None:
            req.finished = True
            self.stats["finished"] += 1
            self.stats["completion_tokens"] += len(row.token_ids)
            self.stats["latency_sum"] += time.perf_counter() - req.arrival
        if text or ids or req.finished:
            logprobs = row.logprobs[len(row.logprobs) - len(ids) :] if row.logprobs is not None and ids else None
            req.emit(Delta(text, ids, row.finish_reason, logprobs))
