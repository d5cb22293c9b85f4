"""`prepare(model, plan)`: every inference-time change to a model, in one place, in a stated order, reported.

The model (`ernie45.model`) is the maths; this is how it runs fast here. The steps, in order (each later step
sees what the earlier ones made):

1. inference only: eval mode, no gradients (the CPU kernels stay out of autograd's way);
2. fuse q/k/v and gate/up into one linear each (`FusedAttention`, `FusedSwiGLU`): before quantizing or packing,
   so those see the fused matrices (per-row quantization gives the same codes either way);
3. quantize (int8 / int4 weight-only) where the plan asks;
4. the fast module variants (`runtime.fused`): RMSNorm, experts, MoE decode block, decoder layer and stack;
5. bf16 linears onto oneDNN's packed layout or the AVX512-BF16 decode kernel (not under torch.compile, which
   packs itself);
6. int8 linears onto FBGEMM's int8 x int8 product (CPUs with VNNI);
7. the weights onto 2 MB pages (CPU, Linux).

The `Report` says what each step did and, where it did nothing, why (no compiler, no AVX512-BF16, a CUDA
device, switched off): `LLM`, `serve`, `chat` and the benchmarks show it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ..model.layers import Attention, RMSNorm, SwiGLU
from ..model.moe import ExpertGroup, MoEBlock
from ..model.trunk import DecoderLayer, DecoderStack
from . import hugepages, kernels
from .fused import (
    FastExpertGroup,
    FastRMSNorm,
    FusedAttention,
    FusedDecoderLayer,
    FusedDecoderStack,
    FusedMoEBlock,
    FusedSwiGLU,
    become,
    stackable,
)
from .packed import pack_bf16_linears
from .quant import QuantExpertGroup, prepare_fbgemm_int8, quantize, quantize_modules

log = logging.getLogger("ernie45")
QUANTIZATIONS = ("int8", "int4", "int4-g64", "int4-g128")


@dataclass
class Plan:
    """What to do to a model. owned: the model is the engine's own (its modules may be replaced; a model passed
    in by a caller is left as it was, apart from quantization when asked)."""

    quantization: str | None = None
    compile: bool = False
    owned: bool = True

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {self.quantization!r}: use {', '.join(QUANTIZATIONS)}")


@dataclass
class Report:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, what it did or why not)

    def add(self, step: str, outcome: str) -> None:
        self.steps.append((step, outcome))

    def __str__(self) -> str:
        width = max((len(s) for s, _ in self.steps), default=0)
        return "\n".join(f"  {s:<{width}}  {o}" for s, o in self.steps)

    def summary(self) -> str:
        """One line: the kernels' state and what was swapped."""
        return "; ".join(f"{s}: {o}" for s, o in self.steps if o)


def prepare(model: nn.Module, plan: Plan | None = None) -> Report:
    """Apply `plan` to `model` in place (module swaps, weight layouts); returns what was done and why not."""
    plan = plan or Plan()
    report = Report()
    cpu = model.device.type == "cpu"
    reason = kernels.unavailable() if cpu else f"a {model.device.type} device (the CPU kernels do not apply)"
    if reason is None and kernels.kernel() is None:
        reason = "the build failed (see the warning above)"
    if reason is None:
        pf = kernels.PREFETCH
        ahead = f"{pf['bytes']} B ahead" if pf.get("bytes") else "none"
        built = "AVX512-BF16" if kernels.isa() == "avx512" else "AVX2 + FMA"
        report.add("CPU kernels", f"on ({built}; weight prefetch {ahead}: {pf.get('why', 'default')})")
    else:
        report.add("CPU kernels", f"off: {reason}")
    model.eval()
    layered = getattr(model, "quantized_while_loading", False)
    if plan.owned:
        model.requires_grad_(False)
        fused = _count(_fuse(model))
        report.add("fuse q/k/v, gate/up", "each layer while loading" if layered and fused == "none" else fused)
    else:
        report.add("fuse q/k/v, gate/up", "no: the model is the caller's (pass a directory to let the engine own it)")
    if plan.quantization:
        quantize(model, **_bits(plan.quantization), lm_head=True)  # head in int8; what is quantized stays
        how = ", layer by layer while loading (the float model never existed whole)" if layered else ""
        report.add("quantize", f"{plan.quantization} weight-only, the LM head in int8{how}")
    if plan.owned:
        report.add("fast modules", _count(_fast_modules(model)))
    if plan.compile:
        report.add("bf16 packing", "no: torch.compile packs itself")
    elif plan.owned and cpu:
        n = pack_bf16_linears(model)
        report.add("bf16 packing", f"{n} linears" if n else "none (no bf16 CPU linears, or oneDNN lacks the ops)")
    if (plan.owned or plan.quantization) and not plan.compile and cpu:
        n = prepare_fbgemm_int8(model)
        why = "ernie45's int8 kernel decodes them" if kernels.ready("int8") else "no int8 linears, or no VNNI"
        report.add("int8 on FBGEMM", f"{n} linears" if n else f"none ({why})")
    if cpu:
        hugepages.trim()  # what loading, fusing and quantizing freed
        moved = hugepages.gather(model)
        hugepages.collapse_process_memory(background=True)
        report.add("2 MB pages", f"{moved / 2**20:.0f} MiB" if moved else "off (ERNIE45_HUGEPAGES=0, or not Linux)")
    log.info("ernie45 runtime:\n%s", report)
    return report


def _bits(quantization: str) -> dict[str, int]:
    kind, _, group = quantization.partition("-g")
    return {"bits": int(kind[3:]), "group_size": int(group or 32)}


class QuantizingLoader:
    """An `on_layer` for `ernie45.load`: each decoder layer fused and quantized as soon as its weights are read,
    as `prepare` would fuse and quantize it afterwards (the same codes), so loading a bf16 checkpoint at int4
    holds the quantized model plus the layers being read in float, never the whole float model."""

    def __init__(self, quantization: str) -> None:
        Plan(quantization=quantization)  # a bad name is refused before anything is read
        self.bits, self.layers = _bits(quantization), 0

    def __call__(self, layer: nn.Module) -> None:
        _fuse(layer)
        quantize_modules(layer, **self.bits, progress=False)
        hugepages.trim()  # the layer's float weights back to the OS, not kept in the heap for later layers
        self.layers += 1


def _count(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"


def _replace(module: nn.Module, swap, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Replace each submodule m by swap(m) where that gives a module, then look inside the (new) child; returns
    how many of each new type."""
    counts = {} if counts is None else counts
    for name, child in list(module.named_children()):
        new = swap(child)
        if new is not None:
            setattr(module, name, new)
            counts[type(new).__name__] = counts.get(type(new).__name__, 0) + 1
            child = new
        _replace(child, swap, counts)
    return counts


def _fuse(model: nn.Module) -> dict[str, int]:
    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) is Attention and stackable(m.q_proj, m.k_proj, m.v_proj):
            return FusedAttention.from_plain(m)
        if type(m) is SwiGLU and stackable(m.gate_proj, m.up_proj):
            return FusedSwiGLU.from_plain(m)
        return None

    return _replace(model, swap)


FAST = {RMSNorm: FastRMSNorm, ExpertGroup: FastExpertGroup, MoEBlock: FusedMoEBlock, DecoderLayer: FusedDecoderLayer,
        DecoderStack: FusedDecoderStack}  # fmt: skip


def _fast_modules(model: nn.Module) -> dict[str, int]:
    def swap(m: nn.Module) -> nn.Module | None:
        cls = FAST.get(type(m))
        return None if cls is None or isinstance(m, QuantExpertGroup) else become(cls, m)

    return _replace(model, swap)


def fuse_projections(model: nn.Module) -> int:
    """Step 2 alone: q/k/v and gate/up as one linear each (inference only: the state dict then has fused names).
    Returns how many modules were fused."""
    return sum(_fuse(model).values())


def use_fast_modules(model: nn.Module) -> int:
    """Step 4 alone: the fast module variants (run it after fusing and quantizing). Returns how many swapped."""
    return sum(_fast_modules(model).values())
