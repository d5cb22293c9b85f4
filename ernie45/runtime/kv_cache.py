"""What a KV cache offers the model and the runtime's fused paths, stated as types (not probed with getattr).

`KVCache` is what the model's attention uses: `update` appends this step's keys and values and returns all of
them, `get_seq_length` says how many are cached. transformers' caches speak it too (duck-typed). A `FusedCache`
also hands out its buffers, so a fused decode call writes the new token's K and V in place (`reserve`), and
says its dtype; only such a cache takes the fused decode paths. The engine's `StaticKVCache` is one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch


class Slot(NamedTuple):
    """What `FusedCache.reserve` hands out for one layer: its K and V buffers [B, KV, max_len, D]; `start`, the
    position this step's token takes (attention then reads positions 0..start, the mask saying which are real);
    and `write_at`, None where every row writes at `start`, else int64 [B] with each row's own position (rows of
    different lengths, as continuous batching's slots hold)."""

    k: torch.Tensor
    v: torch.Tensor
    start: int
    write_at: torch.Tensor | None = None


class KVCache(ABC):
    @abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, KV, S, D] to layer `layer_idx`; return the layer's cached keys and values so far."""

    @abstractmethod
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached in layer `layer_idx`."""


class FusedCache(KVCache):
    dtype: torch.dtype

    @abstractmethod
    def reserve(self, layer_idx: int, n: int = 1) -> Slot:
        """Where the layer's next `n` tokens go, counted as written (the caller writes them)."""
