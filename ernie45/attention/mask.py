"""FlashMask: an attention mask stored as O(N) column-wise row intervals (arXiv 2410.01359).

Key column j is masked for query rows ``LTS[j] <= i < LTE[j]`` and ``UTS[j] <= i < UTE[j]`` (plus
``i < j`` when causal). The argument is Paddle's ``startend_row_indices`` ``[B, 1|Hk, Sk, C]``:

=======  ===  ====================  ==========================================
causal    C   columns               masked when
=======  ===  ====================  ==========================================
True      1   LTS                   i >= LTS_j, or i < j
True      2   LTS, LTE              LTS_j <= i < LTE_j, or i < j
False     2   LTS, UTE              i >= LTS_j, or i < UTE_j
False     4   LTS, LTE, UTS, UTE    either interval
=======  ===  ====================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALLOWED_C = {True: (1, 2), False: (2, 4)}


@dataclass(frozen=True)
class Bounds:
    """Per column-block min and max of each interval vector: what tile classification reads."""

    lts_min: torch.Tensor
    lts_max: torch.Tensor
    lte_min: torch.Tensor
    lte_max: torch.Tensor
    uts_min: torch.Tensor
    uts_max: torch.Tensor
    ute_min: torch.Tensor
    ute_max: torch.Tensor


class FlashMask:
    """A validated FlashMask in normal form: four int32 vectors ``[B, Hm, Sk]`` and a causal flag."""

    def __init__(self, startend_row_indices: torch.Tensor, causal: bool, num_rows: int | None = None) -> None:
        idx = startend_row_indices
        if not isinstance(idx, torch.Tensor) or idx.dim() != 4:
            got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"startend_row_indices must be a 4-D tensor [B, 1|Hk, Sk, C]; got {got}")
        if idx.dtype not in (torch.int32, torch.int64, torch.int16):
            raise ValueError(f"startend_row_indices must hold integers (int32); got {idx.dtype}")
        c = idx.shape[-1]
        if c not in ALLOWED_C[bool(causal)]:
            raise ValueError(
                f"causal={bool(causal)} takes C in {ALLOWED_C[bool(causal)]} columns "
                "(causal: [LTS] or [LTS, LTE]; non-causal: [LTS, UTE] or [LTS, LTE, UTS, UTE]); "
                f"got C={c}"
            )
        self.causal = bool(causal)
        self.num_rows = idx.shape[2] if num_rows is None else num_rows
        rows = self.num_rows
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > rows):
            raise ValueError(f"row indices must lie in [0, {rows}]; got [{int(idx.min())}, {int(idx.max())}]")
        idx = idx.to(torch.int32)
        zeros = torch.zeros_like(idx[..., 0])
        full = torch.full_like(idx[..., 0], rows)
        self.lts = idx[..., 0].contiguous()
        if self.causal:
            self.lte = idx[..., 1].contiguous() if c == 2 else full
            self.uts, self.ute = zeros, zeros
        elif c == 2:
            self.lte, self.uts, self.ute = full, zeros, idx[..., 1].contiguous()
        else:
            self.lte, self.uts, self.ute = (idx[..., k].contiguous() for k in (1, 2, 3))
        self.startend_row_indices = idx

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, Hm, Sk)."""
        return tuple(self.lts.shape)

    @property
    def nbytes(self) -> int:
        return self.startend_row_indices.numel() * 4

    def to(self, device) -> FlashMask:
        return FlashMask(self.startend_row_indices.to(device), self.causal, self.num_rows)

    def masked(self, rows: torch.Tensor, cols: torch.Tensor, b: int | slice = slice(None), h=slice(None)):
        """True where query ``rows`` [R] may NOT see key ``cols`` [K]: bool [..., R, K]."""
        i = rows[:, None]
        lts, lte, uts, ute = (v[b, h, cols][..., None, :] for v in (self.lts, self.lte, self.uts, self.ute))
        m = ((i >= lts) & (i < lte)) | ((i >= uts) & (i < ute))
        if self.causal:
            m = m | (i < cols[None, :])
        return m

    def to_dense(self) -> torch.Tensor:
        """bool [B, Hm, Sq, Sk], True where attention is allowed (SDPA's convention)."""
        dev = self.lts.device
        return ~self.masked(torch.arange(self.num_rows, device=dev), torch.arange(self.shape[2], device=dev))

    def bounds(self, block: int) -> Bounds:
        """Min/max of each vector over column blocks of `block` columns (tail block: real columns only)."""
        b, h, s = self.shape
        tc = -(-s // block)
        pad = tc * block - s

        def minmax(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lo = torch.nn.functional.pad(v, (0, pad), value=torch.iinfo(torch.int32).max).view(b, h, tc, block)
            hi = torch.nn.functional.pad(v, (0, pad), value=torch.iinfo(torch.int32).min).view(b, h, tc, block)
            return lo.amin(-1), hi.amax(-1)

        return Bounds(*minmax(self.lts), *minmax(self.lte), *minmax(self.uts), *minmax(self.ute))

    def classify(self, row_block: int, col_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, partial) bool [B, Hm, Tr, Tc]: tiles that are surely fully masked / may be partly masked.

        A tile that is neither is fully visible. Conservative as in the paper: a tile only covered by the
        union of the two intervals counts as partial, never as skipped.
        """
        bd = self.bounds(col_block)
        s_q, s_k = self.num_rows, self.shape[2]
        dev = self.lts.device
        r0 = torch.arange(0, s_q, row_block, device=dev)[:, None]
        r1 = (r0 + row_block).clamp(max=s_q)
        c0 = torch.arange(0, s_k, col_block, device=dev)[None, :]
        c1 = (c0 + col_block).clamp(max=s_k)

        def span(lo_min, lo_max, hi_min, hi_max):
            e = lambda t: t[:, :, None, :]  # noqa: E731  [B, Hm, 1, Tc]
            full = (r0 >= e(lo_max)) & (r1 <= e(hi_min))
            part = (r0 < e(hi_max)) & (r1 > e(lo_min))
            return full, part

        lower_full, lower_part = span(bd.lts_min, bd.lts_max, bd.lte_min, bd.lte_max)
        upper_full, upper_part = span(bd.uts_min, bd.uts_max, bd.ute_min, bd.ute_max)
        skip = lower_full | upper_full
        partial = lower_part | upper_part
        if self.causal:
            skip = skip | (r1 - 1 < c0)  # every row of the tile is above the diagonal
            partial = partial | (r0 < c1 - 1)  # the tile touches the diagonal
        return skip, partial & ~skip
