"""The CPU path: FlashMask tile classification decides which key blocks each query block reads at all.

Per query block, the key blocks that are not fully masked (per-column-block min/max, as in the
paper) are gathered and attended in one matmul; the element mask is applied only there. Work and
memory follow the unmasked area, and autograd gives the backward over exactly the same gathered blocks.
"""

from __future__ import annotations

import torch

from .mask import FlashMask
from .reference import expand_heads, masked_softmax_attention

ROW_BLOCK = 256
COL_BLOCK = 128


def _ranges(blocks: list[int], size: int, total: int) -> list[tuple[int, int]]:
    """Contiguous column ranges covering the given block indices."""
    out: list[tuple[int, int]] = []
    for c in blocks:
        lo, hi = c * size, min((c + 1) * size, total)
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def blocksparse_attention(q, k, v, mask: FlashMask, scale: float | None = None,
                          row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK):  # fmt: skip
    """q [B,Hq,S,D], k/v [B,Hk,S,D] -> (out [B,Hq,S,D], lse [B,Hq,S])."""
    b, hq, s_q, _ = q.shape
    s_k = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hm = mask.shape[1]
    k, v = expand_heads(k, hq), expand_heads(v, hq)
    skip, _ = mask.classify(row_block, col_block)
    skip = skip.cpu()
    per_mask_head = hq // hm
    outs, lses = [], []
    for bi in range(b):
        head_out, head_lse = [], []
        for h in range(hm):
            heads = slice(h * per_mask_head, (h + 1) * per_mask_head)
            rows_out, rows_lse = [], []
            for r, r0 in enumerate(range(0, s_q, row_block)):
                r1 = min(r0 + row_block, s_q)
                keep = (~skip[bi, h, r]).nonzero()[:, 0].tolist()
                spans = _ranges(keep, col_block, s_k) or [
                    (0, 0)
                ]  # nothing visible: an empty, still-differentiable span
                cols = torch.cat([torch.arange(lo, hi, device=q.device) for lo, hi in spans])
                ks = torch.cat([k[bi, heads, lo:hi] for lo, hi in spans], dim=1)
                vs = torch.cat([v[bi, heads, lo:hi] for lo, hi in spans], dim=1)
                allowed = ~mask.masked(torch.arange(r0, r1, device=q.device), cols, bi, h)
                o, lse = masked_softmax_attention(q[bi, heads, r0:r1], ks, vs, allowed, scale)
                rows_out.append(o)
                rows_lse.append(lse)
            head_out.append(torch.cat(rows_out, dim=1))
            head_lse.append(torch.cat(rows_lse, dim=1))
        outs.append(torch.cat(head_out))
        lses.append(torch.cat(head_lse))
    return torch.stack(outs), torch.stack(lses)
