"""bf16 linears on CPU through oneDNN's prepacked weights.

On CPUs without AMX, torch's bf16 `F.linear` reads weights well below the memory bandwidth; the same matmul on
a weight reordered once into oneDNN's blocked layout is faster for one row (decode) and for hundreds (prefill):
docs/performance.md, "Measurements behind the code". Inference only: a packed weight is an opaque oneDNN tensor,
kept out of the state dict.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..model.trunk import ENCODER_MODULES  # few tokens each: left as they are
from . import kernels


def _mkldnn_ops() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@lru_cache(maxsize=1)
def _reorders() -> bool:
    """Whether oneDNN packs a bf16 weight on this CPU (it refuses without AVX512-BW/VL/DQ or AVX-NE-CONVERT, e.g.
    on a Zen 3 EPYC)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(64, 64, dtype=torch.bfloat16), None)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@lru_cache(maxsize=1)
def bf16_matmul_in_fp32() -> bool:
    """Whether a bf16 matmul of many rows (prefill) is faster here with both operands widened to fp32 first, the
    weight's widening included. Measured once (~50 ms), not assumed from the CPU's flags: without AVX512-BF16 or
    AMX oneDNN may multiply bf16 on a slow path (docs/performance.md, "The kernels on a CPU without AVX-512").
    Where it is, `PackedLinear`, the quantized linears' prefill and the routed experts widen (the
    numbers differ from bf16's only by bf16's rounding of the product, which fp32 keeps)."""
    x, w = torch.randn(256, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
    return clearly_faster(lambda: F.linear(x.float(), w.float()), lambda: F.linear(x, w))


def clearly_faster(candidate, incumbent, runs: int = 3) -> bool:
    """Whether `candidate()` takes under 0.8 of `incumbent()`'s time here (the best of `runs` alternating calls
    each): how a route is picked by measuring, once, on the CPU at hand."""
    best = [float("inf"), float("inf")]
    for _ in range(runs):
        for i, fn in enumerate((candidate, incumbent)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] < 0.8 * best[1]


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for many rows of bf16 (or bf16 weights), widened to fp32 where that is faster here
    (`bf16_matmul_in_fp32`); the result in x's dtype."""
    if x.device.type == "cpu" and torch.bfloat16 in (x.dtype, w.dtype) and bf16_matmul_in_fp32():
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _swappable(linear: nn.Linear) -> bool:
    """A `PackedLinear` can hold it: the decode kernel reads it, or oneDNN packs it."""
    return (kernels.kernel() is not None and kernels.usable(linear.weight.detach())) or _reorders()


class PackedLinear(nn.Module):
    """An `nn.Linear` whose bf16 weight lives in oneDNN's layout; other input dtypes are cast to bf16.

    Where the AVX512-BF16 decode kernel runs (`kernels`, on by default), up to `kernels.MAX_ROWS` rows read the
    plain weight through it instead, and more rows a matmul on the plain weight (the packed copy is then not made).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.plain = w.contiguous() if kernels.kernel() is not None and kernels.usable(w) else None
        if self.plain is None and not _reorders():
            raise ValueError("PackedLinear: neither the bf16 decode kernel nor oneDNN's bf16 packing runs here for "
                             f"this weight {list(w.shape)}; keep the nn.Linear (`pack_bf16_linears` does)")  # fmt: skip
        self.packed = None if self.plain is not None else torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is None:
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")
            return y.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= kernels.MAX_ROWS:  # rounded to bf16 in the kernel where no bias follows
            y = kernels.gemv(x2, self.plain, self.bias is None and x.dtype == torch.bfloat16)
        else:
            y = linear_rows(x2.to(torch.bfloat16), self.plain)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        isa = "AVX512-BF16" if kernels.isa() == "avx512" else "AVX2"
        kind = "oneDNN-packed" if self.plain is None else f"{isa} decode kernel"
        return f"in={self.in_features}, out={self.out_features}, bf16 {kind}"


def pack_bf16_linears(model: nn.Module) -> int:
    """Swap each CPU bf16 `nn.Linear` of the trunk and LM head for a `PackedLinear` (where the decode kernel reads
    it or oneDNN packs it on this CPU); returns how many swapped.

    The first swap is checked against `F.linear`; if the kernel is missing or disagrees nothing is swapped.
    """
    targets = []
    for path, parent in model.named_modules():
        if any(e in path for e in ENCODER_MODULES):
            continue
        for name, child in parent.named_children():
            w = getattr(child, "weight", None)
            if type(child) is nn.Linear and w.dtype == torch.bfloat16 and w.device.type == "cpu":
                targets.append((parent, name, child))
    if not _mkldnn_ops():
        return 0
    targets = [t for t in targets if _swappable(t[2])]  # the rest stay torch's linear
    if not targets:
        return 0
    try:
        probe = targets[0][2]
        x = torch.randn(3, probe.in_features, dtype=torch.bfloat16)
        want = F.linear(x.float(), probe.weight.float(), None if probe.bias is None else probe.bias.float())
        got = PackedLinear(probe)(x).float()
        if not torch.allclose(got, want, rtol=0.05, atol=0.05 * want.abs().max().item() + 1e-3):
            return 0
    except (RuntimeError, NotImplementedError):  # a build without the oneDNN linear ops: keep F.linear
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
