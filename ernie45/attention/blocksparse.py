"""The CPU path: FlashMask tile classification decides which key blocks each query block reads at all.

Per query block, the key blocks that are not fully masked (per-column-block min/max, as in the
paper) are gathered and attended in one matmul per key/value head (the query heads of a GQA group
share it); the element mask is applied only there. Work and memory follow the unmasked area, and
autograd gives the backward over exactly the same gathered blocks.
"""

from __future__ import annotations

import torch

from .mask import FlashMask

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


def _gather(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """x [H, S, D] -> the rows of the spans [H, K, D] (a view when there is one span)."""
    if len(spans) == 1:
        return x[:, spans[0][0] : spans[0][1]]
    return torch.cat([x[:, lo:hi] for lo, hi in spans], dim=1)


def _manual_tile(q, k, v, allowed):
    """Unfused tile attention (any device, any K including 0): q [Hk, G, R, D] pre-scaled."""
    hk, g, r, d = q.shape
    scores = (q.reshape(hk, g * r, d) @ k.transpose(1, 2)).view(hk, g, r, -1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_zeros(hk, g, r, 1)
    m = m.masked_fill(torch.isinf(m), 0.0)  # empty rows: exp(-inf - 0) = 0 everywhere
    e = torch.exp(scores - m)
    total = e.sum(-1, keepdim=True)
    probs = e / total.clamp(min=torch.finfo(e.dtype).tiny)
    out = (probs.view(hk, g * r, -1) @ v).view(hk, g, r, -1)
    return out, (m + torch.log(total)).squeeze(-1)


def _tile_attention(q, k, v, allowed, scale: float):
    """q [Hk, G, R, D], k/v [Hk, K, D], allowed [R, K] -> out [Hk, G, R, D], lse [Hk, G, R] (-inf: empty row).

    On CPU this is PyTorch's fused flash kernel with the tile's mask as an additive bias; the query
    heads of a GQA group are stacked as rows so K and V are read once per key/value head.
    """
    hk, g, r, d = q.shape
    if not q.is_cpu or k.shape[1] == 0:
        return _manual_tile(q * scale, k, v, allowed)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    bias = bias.expand(g, r, -1).reshape(g * r, -1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(hk, 1, g * r, d), k[:, None], v[:, None], attn_mask=bias, scale=scale
    )
    empty = ~allowed.any(-1)
    return out.view(hk, g, r, -1), lse.view(hk, g, r).float().masked_fill(empty, float("-inf")).to(q.dtype)


def blocksparse_attention(
    q, k, v, mask: FlashMask, scale: float | None = None, row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK
):
    """q [B,Hq,S,D], k/v [B,Hk,S,D] -> (out [B,Hq,S,D], lse [B,Hq,S])."""
    b, hq, s_q, d = q.shape
    hk, s_k = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    hm = mask.shape[1]
    skip = mask.classify(row_block, col_block)[0].cpu()
    kv_per_mask = hk // hm  # mask head h covers kv heads [h * kv_per_mask, ...)
    group = hq // hk
    outs, lses = [], []
    for bi in range(b):
        head_out, head_lse = [], []
        for h in range(hm):
            kvh = slice(h * kv_per_mask, (h + 1) * kv_per_mask)
            qh = q[bi, h * kv_per_mask * group : (h + 1) * kv_per_mask * group].view(kv_per_mask, group, s_q, d)
            rows_out, rows_lse = [], []
            for r, r0 in enumerate(range(0, s_q, row_block)):
                r1 = min(r0 + row_block, s_q)
                keep = (~skip[bi, h, r]).nonzero()[:, 0].tolist()
                spans = _ranges(keep, col_block, s_k) or [(0, 0)]  # nothing visible: empty but differentiable
                cols = torch.cat([torch.arange(lo, hi, device=q.device) for lo, hi in spans])
                allowed = ~mask.masked(torch.arange(r0, r1, device=q.device), cols, bi, h)
                o, lse = _tile_attention(
                    qh[:, :, r0:r1], _gather(k[bi, kvh], spans), _gather(v[bi, kvh], spans), allowed, scale
                )
                rows_out.append(o)
                rows_lse.append(lse)
            head_out.append(torch.cat(rows_out, dim=2).reshape(kv_per_mask * group, s_q, -1))
            head_lse.append(torch.cat(rows_lse, dim=2).reshape(kv_per_mask * group, s_q))
        outs.append(torch.cat(head_out))
        lses.append(torch.cat(head_lse))
    return torch.stack(outs), torch.stack(lses)
