"""Builders for the common FlashMask patterns (spec flashmask.md §1.4). All sizes are token counts.

Each returns a `FlashMask` of batch 1 and one mask head; `stack` combines per-row masks into a batch.
"""

from __future__ import annotations

import itertools

import torch

from .mask import FlashMask


def _mask(cols: list[list[int]], causal: bool) -> FlashMask:
    """cols: per key column its C values."""
    t = torch.tensor(cols, dtype=torch.int32)
    return FlashMask(t[None, None], causal)


def _starts(lengths: list[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(lengths))
    return [(e - n, e) for n, e in zip(lengths, ends, strict=True)]


def causal(seq: int) -> FlashMask:
    return _mask([[seq]] * seq, True)


def causal_document(doc_lens: list[int], total: int | None = None) -> FlashMask:
    """Packed documents, each causal and blind to the others. Padding up to `total` sees nothing (ERNIE)."""
    cols = [[end] for start, end in _starts(doc_lens) for _ in range(start, end)]
    n = len(cols)
    cols += [[j] for j in range(n, total or n)]
    return _mask(cols, True)


def document(doc_lens: list[int]) -> FlashMask:
    """Packed documents with bidirectional attention inside each (e.g. ViT frames)."""
    return _mask([[end, start] for start, end in _starts(doc_lens) for _ in range(start, end)], False)


def shared_question(samples: list[tuple[int, list[int]]], total: int | None = None) -> FlashMask:
    """DPO / reward packing: each sample is (question length, [answer lengths]); answers see the question
    and themselves, not each other. Padding up to `total` sees nothing."""
    cols: list[list[int]] = []
    for q_len, answers in samples:
        start = len(cols)
        end = start + q_len + sum(answers)
        cols += [[end]] * q_len
        pos = start + q_len
        for a in answers:
            cols += [[pos + a]] * a
            pos += a
    n = len(cols)
    return _mask(cols + [[j] for j in range(n, total or n)], True)


def sliding_window(seq: int, window: int) -> FlashMask:
    """Causal; each token sees itself and the `window` tokens before it."""
    return _mask([[min(j + window + 1, seq)] for j in range(seq)], True)


def causal_blockwise(block_lens: list[int]) -> FlashMask:
    """Blocks causal within themselves; the last block also sees every earlier block."""
    spans = _starts(block_lens)
    last, seq = spans[-1][0], spans[-1][1]
    cols = [[end, last] for start, end in spans[:-1] for _ in range(start, end)]
    return _mask(cols + [[seq, seq]] * (seq - last), True)


def prefix_lm(seq: int, prefix: int) -> FlashMask:
    """Bidirectional over the prefix, causal after it."""
    return _mask([[seq, 0 if j < prefix else j] for j in range(seq)], False)


def prefix_lm_document(docs: list[tuple[int, int]]) -> FlashMask:
    """Packed prefix-LM documents: (length, prefix length) each."""
    cols = []
    for (start, end), (_, prefix) in zip(_starts([d[0] for d in docs]), docs, strict=True):
        cols += [[end, start if j - start < prefix else j] for j in range(start, end)]
    return _mask(cols, False)


def global_sliding(seq: int, n_global: int, radius: int) -> FlashMask:
    """The first `n_global` tokens see and are seen by all; the rest see +-`radius` around themselves."""
    cols = []
    for j in range(seq):
        if j < n_global:
            cols.append([seq, seq, 0, 0])
        else:
            cols.append([min(j + radius + 1, seq), seq, n_global, max(j - radius, n_global)])
    return _mask(cols, False)


def qk_sparse(seq: int, evicted: dict[int, tuple[int, int]]) -> FlashMask:
    """Causal, with key column j hidden from query rows [start, end) for each entry j: (start, end)."""
    return _mask([list(evicted.get(j, (seq, seq))) for j in range(seq)], True)


def image_in_text(seq: int, spans: list[tuple[int, int]]) -> FlashMask:
    """Causal text with bidirectional image spans [start, end): image tokens see their whole image."""
    ute = list(range(seq))
    for start, end in spans:
        ute[start:end] = [start] * (end - start)
    return _mask([[seq, u] for u in ute], False)


def padding(valid: int, total: int, left: bool = False) -> FlashMask:
    """Causal attention over `valid` real tokens padded to `total`; pad keys are seen by no real token."""
    if left:
        pad = total - valid
        return _mask([[0]] * pad + [[total]] * valid, True)
    return _mask([[total]] * valid + [[j] for j in range(valid, total)], True)


def stack(masks: list[FlashMask]) -> FlashMask:
    """One mask per batch row -> a batch mask (all the same length, causality and C)."""
    idx = torch.cat([m.startend_row_indices for m in masks])
    return FlashMask(idx, masks[0].causal, masks[0].num_rows)
