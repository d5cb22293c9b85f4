"""FlexAttention backend: the BlockMask comes from FlashMask's per-block min/max, not from evaluating the
mask on every (query, key) point, so building it costs O(B * H * Tr * Tc) instead of O(S^2)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .mask import FlashMask

BLOCK = 128


def _block_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Tr, Tc] bool -> (count [..., Tr], column-block indices, selected first [..., Tr, Tc])."""
    num = sel.sum(-1).to(torch.int32)
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def mask_mod_for(mask: FlashMask, q_heads: int):
    """FlexAttention's mask_mod (True = keep) reading the interval vectors."""
    ratio = q_heads // mask.shape[1]
    lts, lte, uts, ute = mask.lts, mask.lte, mask.uts, mask.ute

    def mask_mod(b, h, q_idx, kv_idx):
        hm = h // ratio
        m = ((q_idx >= lts[b, hm, kv_idx]) & (q_idx < lte[b, hm, kv_idx])) | (
            (q_idx >= uts[b, hm, kv_idx]) & (q_idx < ute[b, hm, kv_idx])
        )
        keep = ~m
        return keep & (q_idx >= kv_idx) if mask.causal else keep

    return mask_mod


def block_mask_from_flashmask(mask: FlashMask, q_heads: int, block: int = BLOCK) -> BlockMask:
    skip, partial = mask.classify(block, block)
    full = ~skip & ~partial
    if mask.shape[1] not in (1, q_heads):  # BlockMask takes 1 or all query heads
        ratio = q_heads // mask.shape[1]
        partial, full = partial.repeat_interleave(ratio, 1), full.repeat_interleave(ratio, 1)
    kv_num, kv_idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=mask_mod_for(mask, q_heads),
        seq_lengths=(mask.num_rows, mask.shape[2]),
    )


def flex_flashmask_attention(q, k, v, mask: FlashMask, scale: float | None = None, block_mask: BlockMask | None = None):
    """(out, lse) with FlexAttention; pass a prebuilt block_mask to reuse it across layers."""
    block_mask = block_mask or block_mask_from_flashmask(mask, q.shape[1])
    out, aux = flex_attention(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
        return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse
