"""The scheduler's decode step with fixed shapes, for torch.compile (inductor on CPU, CUDA graphs on GPU).

Eager decode attends over the slots' filled lengths, so each step has new shapes and a compiled step would
recompile. Here a step covers every slot of the cache and its whole length under a mask, and each row writes its
token at a position held in a tensor: every step has the shapes of the first, and one compiled graph serves every
step of an engine and of the next engines with the same slot count and length bucket (the slot caches are kept
per shape for that reason). If compiling fails, the engine says why once and decodes eagerly.
"""

from __future__ import annotations

import logging
import math

import torch

from ..runtime.kv_cache import KVCache
from .slots import SlotKVCache

log = logging.getLogger("ernie45.engine")
LENGTH_BUCKET = 256  # cache lengths round up to this, so nearby prompt + max_tokens share one graph


class FixedSlotsView(KVCache):
    """All slots of a `SlotKVCache` at their whole length: row r writes its token at `at[r]` (idle rows at the
    scratch position) and reads every position, the step's mask hiding what is not written. The tensors here
    are filled in place before each step, so the compiled graph always sees the same inputs."""

    def __init__(self, cache: SlotKVCache) -> None:
        slots, dev = len(cache.lengths), cache.device
        self.cache = cache
        self.rows = torch.arange(slots, device=dev)
        self.at = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(slots, 1, 1, cache.max_len, dtype=torch.bool, device=dev)
        self._k_pos = torch.arange(cache.max_len, device=dev)

    def prepare(self, active: torch.Tensor) -> None:
        """This step's write positions, positions and mask from the slots' lengths (`active`: bool [slots])."""
        c = self.cache
        lengths = torch.tensor(c.lengths, device=self.at.device)
        self.at.copy_(torch.where(active.to(self.at.device), lengths, c.max_len))
        self.positions.copy_((lengths + torch.tensor(c.deltas, device=self.at.device))[:, None])
        self.mask.copy_((self._k_pos[None, :] <= lengths[:, None])[:, None, None, :])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.max_len - 1  # the step reads every position (a constant: no guard changes per step)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        c.k[layer_idx][self.rows, :, self.at] = k[:, :, 0]
        c.v[layer_idx][self.rows, :, self.at] = v[:, :, 0]
        return c.k[layer_idx][:, :, : c.max_len], c.v[layer_idx][:, :, : c.max_len]


class CompiledDecoder:
    """Owns the compiled step and the slot caches it was compiled for (one per slot count and length bucket)."""

    def __init__(self, model, backend="inductor") -> None:
        self.model = model
        cuda = next(model.parameters()).device.type == "cuda"
        # reduce-overhead: CUDA graphs replay the whole step; on CPU inductor's fused kernels are what helps
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.caches: dict[tuple[int, int], tuple[SlotKVCache, FixedSlotsView]] = {}
        self.failed: str | None = None
        # freezing: inductor folds the (inference-only) weights in as constants and prepacks the CPU linears
        options = {"freezing": True} if backend == "inductor" and not cuda else None
        self._fn = torch.compile(self._step, backend=backend, mode=mode, dynamic=False, options=options)

    def cache(self, slots: int, length: int) -> SlotKVCache:
        """A slot cache of `slots` slots holding at least `length` tokens (rounded up to the bucket), emptied."""
        limit = self.model.config.max_position_embeddings
        length = min(math.ceil(length / LENGTH_BUCKET) * LENGTH_BUCKET, limit)
        key = (slots, length)
        if key not in self.caches:
            cache = SlotKVCache.for_model(self.model, slots, length)
            self.caches[key] = (cache, FixedSlotsView(cache))
        cache = self.caches[key][0]
        for s in range(slots):
            cache.reset(s)
        return cache

    def step(self, cache: SlotKVCache, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One decode step over every slot of `cache` (one of `self.cache`'s): tokens [slots, 1] -> logits
        [slots, vocab]; the active slots' lengths grow by one."""
        view = next(v for c, v in self.caches.values() if c is cache)
        view.prepare(active)
        logits = self._call(tokens, view)
        for r in active.nonzero().flatten().tolist():
            cache.lengths[r] += 1
        return logits

    def _step(self, tokens: torch.Tensor, view: FixedSlotsView) -> torch.Tensor:
        text = torch.zeros_like(tokens)  # decoded tokens are text
        out = self.model(input_ids=tokens, attention_mask=view.mask, position_ids=view.positions, cache=view,
                         moe_mm_token_type_ids=text)  # fmt: skip
        return out.logits[:, -1]

    def _call(self, tokens: torch.Tensor, view: FixedSlotsView) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._fn(tokens, view)
            except Exception as e:  # noqa: BLE001 — any compiler failure: say so once, then decode eagerly
                self.failed = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log.warning("compiled decode is unavailable (%s); decoding eagerly", self.failed)
        return self._step(tokens, view)
