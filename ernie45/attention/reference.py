"""The dense reference: materialise the mask, softmax attention, empty rows give 0. For tests and debugging."""

from __future__ import annotations

import torch

from .mask import FlashMask


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, h, ...] -> [B, heads, ...]: query head i uses group i // (heads / h) (GQA and mask heads)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def masked_softmax_attention(q, k, v, allowed: torch.Tensor, scale: float):
    """q [B,H,Sq,D], k/v [B,H,Sk,D], allowed bool broadcastable to [B,H,Sq,Sk] -> (out, lse)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(-1, keepdim=True)
    safe = scores.masked_fill(~any_allowed, 0.0)  # empty rows: finite logits, zeroed below
    probs = safe.softmax(-1) * any_allowed
    lse = torch.logsumexp(scores, -1)  # -inf on empty rows
    return probs @ v, lse


def reference_attention(q, k, v, mask: FlashMask | None, scale: float | None = None, causal: bool = False):
    """Dense attention in q's dtype (pass fp64 tensors for a high-precision reference)."""
    h = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_heads(k, h), expand_heads(v, h)
    if mask is None:
        s_q, s_k = q.shape[2], k.shape[2]
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(s_k - s_q)
    else:
        allowed = expand_heads(mask.to_dense(), h)
    return masked_softmax_attention(q, k, v, allowed, scale)
