"""Greedy packing of samples into fixed-size rows with a FlashMask, and the padded (unpacked) alternative.

Packed rows attend within each sample only (causal-document mask; DPO: the shared-question mask so the
chosen and rejected answers both see the prompt but not each other), position ids restart per sample
(the rejected answer restarts right after the prompt), and the first token of every sample is never a
target, so packed and unpacked batches train on exactly the same predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention import builders
from .data import Sample

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "audio_values",
              "audio_lengths")  # fmt: skip
PositionFn = Callable[[Sample, int], torch.Tensor]  # (sample, length) -> [L] or [3, L] positions


def text_positions(sample: Sample, length: int) -> torch.Tensor:
    return torch.arange(length)


def pack(samples: list[Sample], budget: int) -> list[list[Sample]]:
    """First-fit in order: deterministic, and each row holds at most `budget` tokens."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for s in samples:
        if len(s) > budget:
            raise ValueError(f"{s.source or 'a sample'} has {len(s)} tokens, more than the {budget}-token row")
        for i, r in enumerate(room):
            if len(s) <= r:
                rows[i].append(s)
                room[i] -= len(s)
                break
        else:
            rows.append([s])
            room.append(budget - len(s))
    return rows


def _targets(s: Sample) -> list[int]:
    return [-100] + s.labels[1:]


def _sample_positions(s: Sample, positions: PositionFn) -> torch.Tensor:
    if s.answers is None:
        return positions(s, len(s))
    chosen, rejected = s.answers
    head = positions(s, len(s) - rejected)  # prompt + chosen
    prompt_end = len(s) - chosen - rejected
    nxt = (head[..., :prompt_end].max() + 1) if prompt_end else torch.tensor(0)
    tail = nxt + torch.arange(rejected)
    if head.dim() == 2:
        tail = tail.expand(head.shape[0], -1)
    return torch.cat([head, tail], dim=-1)


def _media(samples: list[Sample]) -> dict[str, torch.Tensor]:
    out = {}
    for key in MEDIA_KEYS:
        parts = [s.media[key] for s in samples if key in s.media]
        if parts:
            out[key] = torch.cat(parts)
    return out


def collate_packed(rows: list[list[Sample]], budget: int, pad_id: int = 0,
                   positions: PositionFn = text_positions) -> dict:  # fmt: skip
    """Rows of samples -> a batch: input_ids, labels, position_ids [B, T] (or [3, B, T]), FlashMask, media, and
    token_mask [B, T] (True on real tokens: the padding is kept out of the MoE losses and the bias update)."""
    ids, labels, pos, masks, real = [], [], [], [], []
    dpo = any(s.answers for r in rows for s in r)
    for row in rows:
        n = sum(len(s) for s in row)
        real.append(torch.arange(budget) < n)
        ids.append(torch.tensor([t for s in row for t in s.input_ids] + [pad_id] * (budget - n)))
        labels.append(torch.tensor([t for s in row for t in _targets(s)] + [-100] * (budget - n)))
        p = torch.cat([_sample_positions(s, positions) for s in row], dim=-1)
        pad = torch.arange(budget - n)
        pos.append(torch.cat([p, pad.expand(p.shape[0], -1) if p.dim() == 2 else pad], dim=-1))
        if dpo:
            masks.append(builders.shared_question([(len(s) - sum(s.answers), list(s.answers)) for s in row],
                                                  total=budget))  # fmt: skip
        else:
            masks.append(builders.causal_document([len(s) for s in row], total=budget))
    position_ids = torch.stack(pos, dim=-2)
    batch = {
        "input_ids": torch.stack(ids),
        "labels": torch.stack(labels),
        "position_ids": position_ids,
        "attention_mask": builders.stack(masks),
        "token_mask": torch.stack(real),  # the real tokens, not the row's padding (for the MoE statistics)
        **_media([s for r in rows for s in r]),
    }
    if dpo:
        batch["answer_spans"] = answer_spans(rows)
        refs = [s.ref_logps for r in rows for s in r]
        if all(r is not None for r in refs):
            batch["ref_logps"] = torch.tensor(refs)
    return batch


def answer_spans(rows: list[list[Sample]]) -> list[tuple[int, int, int, int, int]]:
    """DPO: (row, chosen start, chosen end, rejected start, rejected end) per pair, in token positions."""
    spans = []
    for b, row in enumerate(rows):
        at = 0
        for s in row:
            c, r = s.answers
            start = at + len(s) - c - r
            spans.append((b, start, start + c, start + c, start + c + r))
            at += len(s)
    return spans


def collate_padded(samples: list[Sample], pad_id: int = 0, positions: PositionFn = text_positions) -> dict:
    """No packing: one sample per row, right-padded, with a 0/1 attention mask."""
    if any(s.answers for s in samples):
        return collate_packed([[s] for s in samples], max(len(s) for s in samples), pad_id, positions)
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    pos = []
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s.input_ids)
        labels[i, : len(s)] = torch.tensor(_targets(s))
        mask[i, : len(s)] = 1
        p = positions(s, len(s))
        pad = torch.arange(width - len(s))
        pos.append(torch.cat([p, pad.expand(p.shape[0], -1) if p.dim() == 2 else pad], dim=-1))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": torch.stack(pos, dim=-2),
            "token_mask": mask.bool(), **_media(samples)}  # fmt: skip
