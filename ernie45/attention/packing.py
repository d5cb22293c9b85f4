"""Packing: several token sequences as one row with a causal-document FlashMask instead of padding."""

from __future__ import annotations

import torch

from . import builders


def pack_sequences(seqs: list[list[int]], total: int | None = None, pad_id: int = 0) -> dict:
    """One packed row: ``input_ids [1, T]``, ``position_ids`` restarting per sequence, and the FlashMask
    (pass it as ``attention_mask``). Padding up to `total` attends to nothing and is seen by nothing."""
    lens = [len(s) for s in seqs]
    n = sum(lens)
    total = total or n
    if total < n:
        raise ValueError(f"{n} tokens do not fit in a packed row of {total}")
    ids = [t for s in seqs for t in s] + [pad_id] * (total - n)
    pos = [p for m in lens for p in range(m)] + list(range(total - n))
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "attention_mask": builders.causal_document(lens, total=total),
        "lengths": lens,
    }


def unpack(values: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Split a packed row's per-token outputs [1, T, ...] back into one tensor per sequence."""
    return list(values[0, : sum(lengths)].split(lengths))
