"""The KV cache of continuous batching: one fixed slot per running request, allocated once.

Buffers are [slots, kv_heads, max_len, head_dim] per layer. A prefill writes one slot through a batch-1
view; a decode step writes one token per slot at each slot's own length through a batched view that
also gives the per-row positions and the attention mask (each row sees only its own filled length).
"""

from __future__ import annotations

import torch

from ..runtime.kv_cache import FusedCache, KVCache, Slot


class SlotKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, dtype, device) -> None:
        shape = (slots, kv_heads, max_len + 1, head_dim)  # the last position: scratch for idle rows
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * slots
        self.deltas = [0] * slots  # 3D RoPE: decode positions continue from the prompt's max + 1
        self.max_len, self.layers, self.device, self.dtype = max_len, layers, device, dtype

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> SlotKVCache:
        c = model.config
        dtype = model.model.embed_tokens.weight.dtype
        return cls(c.num_hidden_layers, slots, c.num_key_value_heads, c.head_dim, max_len, dtype, model.device)

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.deltas[slot] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot dst starts with slot src's first n cached tokens (a shared prompt prefix)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst], self.deltas[dst] = n, self.deltas[src]

    def slot(self, i: int) -> _SlotView:
        return _SlotView(self, i)

    def decode(self, n: int, active: torch.Tensor) -> _DecodeView:
        return _DecodeView(self, n, active)

    def fresh(self, slots: list[int], lengths: list[int]) -> _FreshView:
        return _FreshView(self, slots, lengths)


class _SlotView(FusedCache):
    """Batch-1 view of one slot for a prefill chunk or a speculative verify. A `FusedCache`: a chunk of one token,
    or a short continuation (`runtime.fused.FusedDecoderStack`), takes the fused decode calls, which write into the
    slot's buffers themselves (`reserve`)."""

    def __init__(self, cache: SlotKVCache, i: int) -> None:
        self.cache, self.i, self.start = cache, i, cache.lengths[i]
        self.dtype = cache.dtype
        self.reserved = [0] * cache.layers  # per layer: tokens the fused calls have written past `start`

    @property
    def rope_deltas(self):
        return torch.tensor([self.cache.deltas[self.i]], device=self.cache.device)

    @rope_deltas.setter
    def rope_deltas(self, value: torch.Tensor) -> None:
        self.cache.deltas[self.i] = int(value.reshape(-1)[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, end = self.cache, self.start + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"the KV cache slot holds {c.max_len} tokens; this step needs {end}")
        c.k[layer_idx][self.i, :, self.start : end] = k[0]
        c.v[layer_idx][self.i, :, self.start : end] = v[0]
        if layer_idx == c.layers - 1:
            c.lengths[self.i] = end
        return c.k[layer_idx][self.i : self.i + 1, :, :end], c.v[layer_idx][self.i : self.i + 1, :, :end]

    def reserve(self, layer_idx: int, n: int = 1) -> Slot:
        c, at = self.cache, self.start + self.reserved[layer_idx]
        if at + n > c.max_len:
            raise ValueError(f"the KV cache slot holds {c.max_len} tokens; this step needs {at + n}")
        self.reserved[layer_idx] += n
        if layer_idx == c.layers - 1:
            c.lengths[self.i] = at + n
        return Slot(c.k[layer_idx][self.i : self.i + 1], c.v[layer_idx][self.i : self.i + 1], at)


class _DecodeView(FusedCache):
    """Slots 0..n-1 take one token each; rows not `active` (free or mid-prefill) compute and are ignored. A
    `FusedCache`: the fused decode calls write each row's token at that row's own length (`Slot.write_at`), so
    the served batch takes the same one-call layer halves and dense-stack step as `LLM`."""

    def __init__(self, cache: SlotKVCache, n: int, active: torch.Tensor) -> None:
        self.cache, self.n = cache, n
        dev = cache.device
        self.len = torch.tensor(cache.lengths[:n], device=dev)
        self.active = active.to(dev)
        self.width = int(self.len.max()) + 1
        self.rows = torch.arange(n, device=dev)
        self.positions = (self.len + torch.tensor(cache.deltas[:n], device=dev))[:, None]
        k_pos = torch.arange(self.width, device=dev)
        self.mask = (k_pos[None, :] <= self.len[:, None])[:, None, None, :]  # [n, 1, 1, width]
        self.dtype = cache.dtype
        self.at = torch.where(self.active, self.len, cache.max_len).contiguous()  # idle rows: the scratch position

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        self._check()
        c.k[layer_idx][self.rows, :, self.at] = k[:, :, 0]
        c.v[layer_idx][self.rows, :, self.at] = v[:, :, 0]
        self._written(layer_idx)
        return c.k[layer_idx][: self.n, :, : self.width], c.v[layer_idx][: self.n, :, : self.width]

    def reserve(self, layer_idx: int, n: int = 1) -> Slot:
        if n != 1:
            raise ValueError("a decode step takes one token per slot")
        c = self.cache
        self._check()
        self._written(layer_idx)
        return Slot(c.k[layer_idx][: self.n], c.v[layer_idx][: self.n], self.width - 1, self.at)

    def _check(self) -> None:
        if self.width > self.cache.max_len:
            raise ValueError(f"the KV cache slot holds {self.cache.max_len} tokens")

    def _written(self, layer_idx: int) -> None:
        if layer_idx == self.cache.layers - 1:
            for r in self.active.nonzero().flatten().tolist():
                self.cache.lengths[r] += 1


class _FreshView(KVCache):
    """Several empty slots prefilled together: prompts right-padded to one width, row r written to slot
    `slots[r]`. Causal attention keeps every real token away from the pads after it; the pads' keys and values
    land past the row's length, where the row's later tokens overwrite them."""

    def __init__(self, cache: SlotKVCache, slots: list[int], lengths: list[int]) -> None:
        self.cache, self.slots, self.lengths = cache, slots, lengths
        self.index = torch.tensor(slots, device=cache.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, width = self.cache, k.shape[2]
        if width > c.max_len:
            raise ValueError(f"the KV cache slot holds {c.max_len} tokens; this prefill needs {width}")
        c.k[layer_idx][self.index, :, :width] = k
        c.v[layer_idx][self.index, :, :width] = v
        if layer_idx == c.layers - 1:
            for slot, n in zip(self.slots, self.lengths, strict=True):
                c.lengths[slot] = n
        return k, v
