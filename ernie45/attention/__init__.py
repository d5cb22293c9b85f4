"""FlashMask attention: O(N) column-wise masks, their builders, and one entry point over several backends.

``flashmask_attention(q, k, v, mask)`` takes PyTorch's ``[B, H, S, D]`` layout (GQA allowed) and picks
the backend in one place: the Triton kernel on a GPU, the block-sparse path on CPU; the dense
reference and FlexAttention on request.
"""

from __future__ import annotations

import torch

from . import builders
from .mask import FlashMask

BACKENDS = ("reference", "blocksparse", "flex", "triton")


def choose_backend(q: torch.Tensor) -> str:
    if q.is_cuda:
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "flex"
    return "blocksparse"


def flashmask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: FlashMask,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention of q [B, Hq, S, D] over k, v [B, Hk, S, D] under `mask`; fully masked rows give 0.

    Returns out [B, Hq, S, D] (and lse [B, Hq, S], -inf on empty rows, with return_lse).
    """
    b, hq, s_q, _ = q.shape
    hk, s_k = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} key/value heads")
    mb, hm, ms = mask.shape
    if mb != b or ms != s_k or mask.num_rows != s_q or (hm != 1 and hm != hk):
        raise ValueError(
            f"mask covers [B={mb}, heads={hm}, keys={ms}, rows={mask.num_rows}] but the inputs are "
            f"[B={b}, kv heads={hk}, keys={s_k}, rows={s_q}]; mask heads must be 1 or {hk}"
        )
    backend = backend or choose_backend(q)
    if backend == "reference":
        from .reference import reference_attention

        out, lse = reference_attention(q, k, v, mask, scale)
    elif backend == "blocksparse":
        from .blocksparse import blocksparse_attention

        out, lse = blocksparse_attention(q, k, v, mask, scale)
    elif backend == "flex":
        from .flex import flex_flashmask_attention

        out, lse = flex_flashmask_attention(q, k, v, mask, scale)
    elif backend == "triton":
        from .triton_kernel import triton_flashmask_attention

        out, lse = triton_flashmask_attention(q, k, v, mask, scale)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return (out, lse) if return_lse else out


__all__ = ["BACKENDS", "FlashMask", "builders", "choose_backend", "flashmask_attention"]
