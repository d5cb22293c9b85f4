"""A KV cache allocated once per request batch: fixed buffers written in place, never reallocated."""

from __future__ import annotations

import torch

from ..runtime.kv_cache import FusedCache, KVCache, Slot


class CacheBuffers(KVCache):
    """Per layer, K and V buffers [B, kv_heads, max_len, head_dim]; ``update`` writes at the current length.
    The model sees only the `KVCache` protocol, so it stays ignorant of how the engine manages memory."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype, device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * layers
        self.max_len, self.dtype = max_len, dtype

    @classmethod
    def for_model(cls, model, batch: int, max_len: int):
        c = model.config
        dtype = model.model.embed_tokens.weight.dtype
        return cls(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, dtype, model.device)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; this step needs {end}")
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


class StaticKVCache(CacheBuffers, FusedCache):
    """The engine's cache for `LLM`: a `FusedCache`, so the fused decode calls write into its buffers."""

    def reserve(self, layer_idx: int, n: int = 1) -> Slot:
        """The layer's K and V buffers and the position where the next `n` tokens go, counted as written (for a
        fused decode step that writes them itself: `layers.Attention.decode_block`)."""
        start = self.lengths[layer_idx]
        if start + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; this step needs {start + n}")
        self.lengths[layer_idx] = start + n
        return Slot(self.k[layer_idx], self.v[layer_idx], start)


class GrowingKVCache(FusedCache):
    """One layer's K and V for one sequence, in buffers that double when full: the MTP block's cache, which holds
    confirmed positions only (it never rolls back) and whose length is not known up front. A `FusedCache`, so the
    MTP block's steps take the same fused calls as the trunk's (whatever `layer_idx` its layer has)."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256) -> None:
        self.k = torch.zeros(1, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length, self.dtype = 0, dtype

    def _room(self, n: int) -> None:
        if self.length + n <= self.k.shape[2]:
            return
        capacity = max(self.length + n, 2 * self.k.shape[2])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(1, old.shape[1], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        self._room(n)
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reserve(self, layer_idx: int, n: int = 1) -> Slot:
        self._room(n)
        self.length += n
        return Slot(self.k, self.v, self.length - n)
