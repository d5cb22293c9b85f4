"""A decode step with fixed shapes, for torch.compile (inductor on CPU, CUDA graphs on GPU).

Eager decode attends over a cache that grows by one position a step, so each step has new shapes and a
compiled step would recompile. Here a step reads the whole fixed-length cache under a mask and writes its
token at a position held in a tensor: every step of a generation has the shapes of the first, and one
compiled graph serves this generation and the next ones of the same batch size and length bucket. The
cache is kept between calls for that reason (a new cache object would be a new graph input to guard on).
If compiling fails, the engine says why once and decodes eagerly.
"""

from __future__ import annotations

import logging
import math

import torch

from .cache import CacheBuffers

log = logging.getLogger("ernie45.engine")
LENGTH_BUCKET = 256  # cache lengths round up to this, so nearby prompt + max_tokens share one graph


class FixedKVCache(CacheBuffers):
    """Fixed buffers whose decode writes go to `at` (a 1-element position tensor) and whose decode reads are the
    whole buffers (the step's mask hides what is not yet written). Not a `FusedCache`: no fused eager step writes
    at the lengths."""

    at: torch.Tensor | None = None

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
        self.at = None
        self.rope_deltas = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.at is None:  # prefill: eager, as the static cache does it
            return super().update(k, v, layer_idx)
        self.k[layer_idx].index_copy_(2, self.at, k)
        self.v[layer_idx].index_copy_(2, self.at, v)
        return self.k[layer_idx], self.v[layer_idx]


class CompiledDecoder:
    """Owns the compiled step and the caches it was compiled for (one per batch size and length bucket)."""

    def __init__(self, model, backend="inductor") -> None:
        self.model = model
        cuda = next(model.parameters()).device.type == "cuda"
        # reduce-overhead: CUDA graphs replay the whole step; on CPU inductor's fused kernels are what helps
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.caches: dict[tuple[int, int], FixedKVCache] = {}
        self.failed: str | None = None
        # freezing: inductor folds the (inference-only) weights in as constants and prepacks the CPU linears
        options = {"freezing": True} if backend == "inductor" and not cuda else None
        self._fn = torch.compile(self._step, backend=backend, mode=mode, dynamic=False, options=options)

    def cache(self, batch: int, length: int) -> FixedKVCache:
        limit = self.model.config.max_position_embeddings
        length = min(math.ceil(length / LENGTH_BUCKET) * LENGTH_BUCKET, limit)
        key = (batch, length)
        if key not in self.caches:
            self.caches[key] = FixedKVCache.for_model(self.model, batch, length)
        cache = self.caches[key]
        cache.reset()
        return cache

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: FixedKVCache):
        text = torch.zeros_like(tokens)  # decoded tokens are text
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                         moe_mm_token_type_ids=text)  # fmt: skip
        return out.logits[:, -1]

    def stepper(self, cache: FixedKVCache, padding_mask: torch.Tensor):
        """The per-token function of one generation whose prompt (left-padded, `padding_mask` [B, width]) is in
        `cache`: tokens [B] -> logits [B, V]."""
        b, width = padding_mask.shape
        dev = padding_mask.device
        allowed = torch.ones(b, cache.max_len, dtype=torch.bool, device=dev)
        allowed[:, :width] = padding_mask.bool()
        slots = torch.arange(cache.max_len, device=dev)
        real = padding_mask.long().sum(1, keepdim=True)  # the next text position of each row
        deltas = getattr(cache, "rope_deltas", None)
        if deltas is not None:
            real = real + deltas.reshape(-1, 1).to(dev)
        cache.at = torch.tensor([width], device=dev)
        written = [width]  # the cache position the next token goes to

        def step(tokens: torch.Tensor) -> torch.Tensor:
            n = written[0]
            if n >= cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} tokens; this step needs {n + 1}")
            mask = (allowed & (slots <= n))[:, None, None, :]
            logits = self._call(tokens[:, None], real + (n - width), mask, cache)
            cache.at += 1
            written[0] = n + 1
            return logits

        return step

    def _call(self, tokens, positions, mask, cache) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._fn(tokens, positions, mask, cache)
            except Exception as e:  # noqa: BLE001 — any compiler failure: say so once, then decode eagerly
                self.failed = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log.warning("compiled decode is unavailable (%s); decoding eagerly", self.failed)
        return self._step(tokens, positions, mask, cache)
