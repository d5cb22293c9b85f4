"""FlashMask in Triton: a FlashAttention-2 style forward and backward that skip fully masked tiles.

Each program owns one query block (forward, dQ) or one key block (dK/dV) of one query head. For every
tile it first reads the per-column-block min/max of the four interval vectors (8 scalars) and skips
the tile when it is fully masked; otherwise it loads the column vectors and masks element-wise.
Runs on a GPU, and on CPU under ``TRITON_INTERPRET=1`` (how the tests check it without one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask import FlashMask

BLOCK_M = 32
BLOCK_N = 32


@triton.jit
def _tile_skipped(bounds, bb, r0, r1, c0, c1, n_blocks, CAUSAL: tl.constexpr):
    """True when the tile rows [r0, r1) x columns [c0, c1) is fully masked (bounds: 8 x [Tc] for this head)."""
    lts_max = tl.load(bounds + 1 * n_blocks + bb)
    lte_min = tl.load(bounds + 2 * n_blocks + bb)
    uts_max = tl.load(bounds + 5 * n_blocks + bb)
    ute_min = tl.load(bounds + 6 * n_blocks + bb)
    skip = ((r0 >= lts_max) & (r1 <= lte_min)) | ((r0 >= uts_max) & (r1 <= ute_min))
    if CAUSAL:
        skip = skip | (r1 - 1 < c0)
    return skip


@triton.jit
def _scores(q, k_ptrs, vec_ptrs, offs_m, offs_n, s_k, s_q, scale, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D):
    """Masked scores of one tile (-inf where masked or out of range)."""
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < s_k
    k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale
    big = 2147483647
    lts = tl.load(vec_ptrs + 0 * s_k + offs_n, mask=col_ok, other=big)
    lte = tl.load(vec_ptrs + 1 * s_k + offs_n, mask=col_ok, other=big)
    uts = tl.load(vec_ptrs + 2 * s_k + offs_n, mask=col_ok, other=0)
    ute = tl.load(vec_ptrs + 3 * s_k + offs_n, mask=col_ok, other=0)
    i = offs_m[:, None]
    masked = ((i >= lts[None, :]) & (i < lte[None, :])) | ((i >= uts[None, :]) & (i < ute[None, :]))
    masked = masked | (~col_ok[None, :]) | (i >= s_q)
    if CAUSAL:
        masked = masked | (i < offs_n[None, :])
    return tl.where(masked, float("-inf"), s)


@triton.jit
def _fwd(
    Q,
    K,
    V,
    O,
    LSE,
    VEC,
    BOUNDS,
    scale,
    s_q,
    s_k,
    D,
    Hq,
    KV_RATIO,
    MASK_RATIO,
    n_blocks,
    Hm,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // KV_RATIO
    hm = h // MASK_RATIO
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + (bh * s_q) * D
    q = tl.load(
        q_base + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < s_q) & (offs_d[None, :] < D), other=0.0
    )
    kv_base = (b * (Hq // KV_RATIO) + hk) * s_k * D
    vec = VEC + (b * Hm + hm) * 4 * s_k
    bounds = BOUNDS + (b * Hm + hm) * 8 * n_blocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    r0 = pid_m * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, s_q)
    for bb in range(0, n_blocks):
        c0 = bb * BLOCK_N
        c1 = tl.minimum(c0 + BLOCK_N, s_k)
        if not _tile_skipped(bounds, bb, r0, r1, c0, c1, n_blocks, CAUSAL):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            k_ptrs = K + kv_base + offs_n[:, None] * D + offs_d[None, :]
            s = _scores(q, k_ptrs, vec, offs_m, offs_n, s_k, s_q, scale, CAUSAL, BLOCK_D, D)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + kv_base + offs_n[:, None] * D + offs_d[None, :],
                mask=(offs_n[:, None] < s_k) & (offs_d[None, :] < D),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))  # +inf: P = 0 in backward
    row_ok = offs_m < s_q
    tl.store(
        O + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(LSE + bh * s_q + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    VEC,
    BOUNDS,
    scale,
    s_q,
    s_k,
    D,
    Hq,
    KV_RATIO,
    MASK_RATIO,
    n_blocks,
    n_row_blocks,
    Hm,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // KV_RATIO
    hm = h // MASK_RATIO
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_base = (b * (Hq // KV_RATIO) + hk) * s_k * D
    kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < D)
    v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    vec = VEC + (b * Hm + hm) * 4 * s_k
    bounds = BOUNDS + (b * Hm + hm) * 8 * n_blocks
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    c0 = pid_n * BLOCK_N
    c1 = tl.minimum(c0 + BLOCK_N, s_k)
    for rb in range(0, n_row_blocks):
        r0 = rb * BLOCK_M
        r1 = tl.minimum(r0 + BLOCK_M, s_q)
        if not _tile_skipped(bounds, pid_n, r0, r1, c0, c1, n_blocks, CAUSAL):
            offs_m = r0 + tl.arange(0, BLOCK_M)
            row_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < D)
            q = tl.load(Q + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(DO + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            lse = tl.load(LSE + bh * s_q + offs_m, mask=offs_m < s_q, other=float("inf"))
            delta = tl.load(DELTA + bh * s_q + offs_m, mask=offs_m < s_q, other=0.0)
            k_ptrs = K + kv_base + offs_n[:, None] * D + offs_d[None, :]
            s = _scores(q, k_ptrs, vec, offs_m, offs_n, s_k, s_q, scale, CAUSAL, BLOCK_D, D)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
    out_base = (bh * s_k) * D
    tl.store(DK + out_base + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    VEC,
    BOUNDS,
    scale,
    s_q,
    s_k,
    D,
    Hq,
    KV_RATIO,
    MASK_RATIO,
    n_blocks,
    Hm,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // KV_RATIO
    hm = h // MASK_RATIO
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < D)
    q = tl.load(Q + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + bh * s_q + offs_m, mask=offs_m < s_q, other=float("inf"))
    delta = tl.load(DELTA + bh * s_q + offs_m, mask=offs_m < s_q, other=0.0)
    kv_base = (b * (Hq // KV_RATIO) + hk) * s_k * D
    vec = VEC + (b * Hm + hm) * 4 * s_k
    bounds = BOUNDS + (b * Hm + hm) * 8 * n_blocks
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    r0 = pid_m * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, s_q)
    for bb in range(0, n_blocks):
        c0 = bb * BLOCK_N
        c1 = tl.minimum(c0 + BLOCK_N, s_k)
        if not _tile_skipped(bounds, bb, r0, r1, c0, c1, n_blocks, CAUSAL):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            k_ptrs = K + kv_base + offs_n[:, None] * D + offs_d[None, :]
            s = _scores(q, k_ptrs, vec, offs_m, offs_n, s_k, s_q, scale, CAUSAL, BLOCK_D, D)
            p = tl.exp(s - lse[:, None])
            kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < D)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k) * scale
    tl.store(DQ + (bh * s_q) * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)


def _prepare(mask: FlashMask):
    vec = torch.stack([mask.lts, mask.lte, mask.uts, mask.ute], dim=2).contiguous()  # [B, Hm, 4, S]
    bd = mask.bounds(BLOCK_N)
    bounds = torch.stack(
        [bd.lts_min, bd.lts_max, bd.lte_min, bd.lte_max, bd.uts_min, bd.uts_max, bd.ute_min, bd.ute_max], dim=2
    ).contiguous()
    return vec, bounds


class _FlashMaskFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: FlashMask, scale: float):
        b, hq, s_q, d = q.shape
        hk, s_k = k.shape[1], k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        vec, bounds = _prepare(mask)
        n_blocks = triton.cdiv(s_k, BLOCK_N)
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, s_q, device=q.device, dtype=torch.float32)
        meta = dict(CAUSAL=mask.causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)))
        args = (scale, s_q, s_k, d, hq, hq // hk, hq // mask.shape[1], n_blocks)
        _fwd[(triton.cdiv(s_q, BLOCK_M), b * hq)](q, k, v, out, lse, vec, bounds, *args, mask.shape[1], **meta)
        ctx.save_for_backward(q, k, v, out, lse, vec, bounds)
        ctx.mask, ctx.scale, ctx.meta, ctx.args = mask, scale, meta, args
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, vec, bounds = ctx.saved_tensors
        b, hq, s_q, d = q.shape
        hk, s_k = k.shape[1], k.shape[2]
        hm = ctx.mask.shape[1]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty_like(q)
        dk_h = torch.empty(b, hq, s_k, d, device=q.device, dtype=q.dtype)  # per query head, summed per group
        dv_h = torch.empty_like(dk_h)
        n_rows = triton.cdiv(s_q, BLOCK_M)
        _bwd_dkdv[(triton.cdiv(s_k, BLOCK_N), b * hq)](
            q, k, v, dout, lse, delta, dk_h, dv_h, vec, bounds, *ctx.args, n_rows, hm, **ctx.meta
        )
        _bwd_dq[(n_rows, b * hq)](q, k, v, dout, lse, delta, dq, vec, bounds, *ctx.args, hm, **ctx.meta)
        dk = dk_h.view(b, hk, hq // hk, s_k, d).sum(2)
        dv = dv_h.view(b, hk, hq // hk, s_k, d).sum(2)
        return dq, dk, dv, None, None


def triton_flashmask_attention(q, k, v, mask: FlashMask, scale: float | None = None):
    """(out, lse) via the Triton kernels; lse is -inf on fully masked rows."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _FlashMaskFn.apply(q, k, v, mask, scale)
    return out, lse.masked_fill(torch.isinf(lse), float("-inf"))
