"""ernie45's own CPU decode kernels (bf16, int8, int4 matvecs, fused small ops, whole layer halves and a dense
stack's step), built on first use with the local C++ compiler (`build.py`; C++ in `csrc/`).

Why they exist: a decode step reads every weight once for one row or a few, so its time is memory traffic.
torch's kernels for one row read weights well below the bandwidth. A plain loop that streams the weights with
AVX512 dot products gets closer. The small ops between the matmuls (norms, RoPE, SwiGLU's product, one-query
attention) cost more than their arithmetic: the streamed weights have pushed their code and data out of the
caches. So they run fused, in one call each, and a layer half or a whole dense stack runs as one call. Every
fused call does the eager code's roundings, so the numbers are the same. What each step measured is in
docs/performance.md.

int4 and int8 would be bound by arithmetic on 2 cores in fp32: both kernels round x to int8 per 32 columns (as
llama.cpp's Q4_0 / Q8_0 x Q8_0 do; ~0.6% relative error on a random product) and multiply codes by x with VNNI.
int4 needs AVX512-VBMI and VNNI besides BF16, int8 VNNI (elsewhere int8 decodes on FBGEMM, `runtime.quant`).

The machines this runs on are not all one CPU. Where there is no AVX512-BF16 but AVX2, FMA and F16C (an AMD EPYC
of the Zen 3 generation, older Intel parts), the same source is built for AVX2 (`isa()`): `csrc/avx2_compat.h`
gives each AVX-512 intrinsic the kernels use as two 256-bit halves, so every kernel, int8 and int4 included, runs
there too.

Switches: `ERNIE45_CPU_KERNELS` unset gives the default kernels (bf16, int8, int4); "bf16" the bf16 one only; "1"
all; "0" none. `ERNIE45_CPU_ISA=avx2` builds the AVX2 form on a CPU that has AVX-512 too (to compare the two);
a value that names no build, or one this CPU cannot run, turns the kernels off with a warning that says so.
Without AVX2 + FMA + F16C or a compiler, `kernel()` is None and callers keep torch's ops (`unavailable()` says
why; `runtime.prepare`'s report shows it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from .build import load_extension
from .kv_cache import Slot

log = logging.getLogger("ernie45")
NAME = "ernie45_cpu_gemv"
MAX_ROWS = 8  # rows one call takes (decode batches); more rows go to a matmul
K_MULTIPLE = 32  # one AVX512-BF16 dot product consumes 32 input columns

# one translation unit, in this order: the matvec kernels, the fused ops built on them, the layer halves, the
# registration of the ops with torch
_SOURCES = [Path(__file__).with_name("csrc") / f
            for f in ("matvec.cpp", "fused_ops.cpp", "layer_blocks.cpp", "ops.cpp")]  # fmt: skip


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def unavailable() -> str | None:
    """Why the kernels cannot run here (None: they can be built and used), without building them."""
    if _mode() == "0":
        return "switched off (ERNIE45_CPU_KERNELS=0)"
    asked = os.environ.get("ERNIE45_CPU_ISA")
    if asked and asked not in _ISA_FLAGS:
        choices = " or ".join(_ISA_FLAGS)
        return f"ERNIE45_CPU_ISA={asked!r} names no build of the kernels (choose {choices}, or unset it)"
    if isa() is None:
        if asked:
            return f"ERNIE45_CPU_ISA={asked}: this CPU lacks {', '.join(sorted(_ISA_FLAGS[asked] - _cpu_flags()))}"
        return "this CPU has neither AVX512-BF16 nor AVX2 with FMA and F16C"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler} not found)"
    return None


_ISA_FLAGS = {"avx512": frozenset({"avx512_bf16"}), "avx2": frozenset({"avx2", "fma", "f16c"})}  # preferred first


def isa() -> str | None:
    """The instruction set the kernels are built for here: the first of "avx512" (AVX512-BF16) and "avx2" (AVX2,
    FMA and F16C) this CPU has, or the one `ERNIE45_CPU_ISA` names where the CPU has it; else None."""
    flags, asked = _cpu_flags(), os.environ.get("ERNIE45_CPU_ISA")
    fits = [name for name, needs in _ISA_FLAGS.items() if needs <= flags and (not asked or name == asked)]
    return fits[0] if fits else None


def build_inputs(target: str | None) -> tuple[list[str], list[str]]:
    """The C++ sources (one unit, in order) and compiler flags of the kernels for `target` ("avx512" or "avx2")."""
    # -fopenmp: at::parallel_for is inline in ATen's headers, and without it runs on one thread
    sources = [f.read_text() for f in _SOURCES]
    if target == "avx2":  # the AVX-512 intrinsics as AVX2 halves, ahead of the kernels in the one unit
        flags = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DERNIE45_AVX2", "-Wno-psabi"]
        return [(Path(__file__).with_name("csrc") / "avx2_compat.h").read_text(), *sources], flags
    # VBMI / VNNI code runs only where the CPU has them (`ready`)
    return sources, ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi",
                     "-mavx512vnni"]  # fmt: skip


@lru_cache(maxsize=1)
def kernel():
    """The ops `torch.ops.ernie45` (`gemv_bf16`, `gemv_int8`, `gemv_int4`, the fused `rmsnorm`, `silu_mul`, `rope`,
    `decode_attention` and the layer calls `attention_block`, `mlp_block`, `dense_stack`, `moe_block`), or None
    where they cannot run here (`unavailable` says why; logged once)."""
    reason = unavailable()
    if reason is not None:  # (a setting that cannot be followed is said louder than the CPU's own lack)
        level = logging.WARNING if reason.startswith("ERNIE45_CPU_ISA") else logging.INFO
        log.log(level, "ernie45 CPU decode kernels: %s; torch's ops run instead", reason)
        return None
    sources, flags = build_inputs(isa())
    ops = load_extension(NAME, sources, "ernie45", flags, ["-fopenmp"])
    if ops is not None:
        _register_fakes()
        PREFETCH.update(_choose_prefetch(ops))
    return ops


PREFETCH: dict = {}  # the weight streams' software prefetch distance this process uses, and why (`_choose_prefetch`)
PREFETCH_CANDIDATES = (2048, 0, 4096)  # bytes ahead (0: none)


def _vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("vendor_id")), "")


def _choose_prefetch(ops) -> dict:
    """The matvec's software prefetch distance for this CPU. Measured end to end (docs/performance.md): the Intel part
    decodes fastest prefetching 2 KB ahead, an AMD EPYC without any (the numbers: "The weight prefetch per CPU"). The
    vendor's measured choice is the start; timing the candidates here (eight 8 MiB bf16 matrices one after the other,
    best of 5 interleaved) moves off it only for a clear 10%, since a shared host's bandwidth varies run to run by
    about as much as the candidates differ. `ERNIE45_PREFETCH=<bytes>` sets it instead."""
    forced = os.environ.get("ERNIE45_PREFETCH")
    if forced is not None:
        ops.set_prefetch(int(forced))
        return {"bytes": int(forced), "why": "ERNIE45_PREFETCH"}
    vendor = _vendor()
    start = 0 if vendor == "AuthenticAMD" else 2048
    ws = [torch.ones(2048, 2048, dtype=torch.bfloat16) for _ in range(8)]  # a decode step's matvecs, in miniature
    x = torch.ones(1, 2048, dtype=torch.bfloat16)
    best: dict[int, float] = {}
    for _ in range(5):
        for pf in PREFETCH_CANDIDATES:
            ops.set_prefetch(pf)
            begin = time.perf_counter()
            for w in ws:
                ops.gemv_bf16(x, w, False)
            took = time.perf_counter() - begin
            best[pf] = min(best.get(pf, took), took)
    chosen, busy = _pick_prefetch(best, start)
    ops.set_prefetch(chosen)
    rates = ", ".join(f"{pf} B {len(ws) * ws[0].nbytes / t / 1e9:.1f}" for pf, t in best.items())
    return {"bytes": chosen, "why": f"{vendor or 'unknown vendor'}; measured GB/s: {rates}{busy}"}


def _pick_prefetch(best: dict[int, float], start: int) -> tuple[int, str]:
    """The distance to use from each candidate's best time: the fastest where it beats the vendor's `start` by a
    clear 10%. The candidates differ by well under 2x on an idle CPU; a spread past that means another process took
    the cores during the timing (one candidate at 1.5 GB/s beside 50), so the timing is not trusted: the vendor's
    start stays, and the second item says so (else it is "")."""
    fastest, slowest = min(best, key=best.get), max(best, key=best.get)
    if best[slowest] > 2 * best[fastest]:
        return start, f" (spread {best[slowest] / best[fastest]:.0f}x: the host was busy, the vendor's default kept)"
    return (fastest if best[fastest] < 0.9 * best[start] else start), ""


def _mode() -> str:
    """`ERNIE45_CPU_KERNELS`: unset the default kernels (bf16, int8, int4), "bf16" the bf16 one only, "1" all, "0"
    none."""
    return os.environ.get("ERNIE45_CPU_KERNELS", "default")


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """All the kernels on, or all off, inside the block; as they were after it."""
    before = os.environ.get("ERNIE45_CPU_KERNELS")
    os.environ["ERNIE45_CPU_KERNELS"] = "1" if on else "0"
    kernel.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["ERNIE45_CPU_KERNELS"]
        else:
            os.environ["ERNIE45_CPU_KERNELS"] = before
        kernel.cache_clear()


def ready(kind: str = "bf16") -> bool:
    """Whether the `kind` ("bf16", "int8", "int4") matvec kernel runs here and now (not while torch.compile
    traces: it keeps torch's own ops)."""
    mode = _mode()
    on = mode == "1" or mode == kind or (mode == "default" and kind in _DEFAULT_KINDS)
    on = on and (_NEEDS.get(kind, frozenset()) <= _cpu_flags() or isa() == "avx2")
    return on and not torch.compiler.is_compiling() and kernel() is not None


_DEFAULT_KINDS = ("bf16", "int8", "int4")
# besides BF16, in the AVX-512 build (the AVX2 build writes VBMI's and VNNI's instructions out itself)
_NEEDS = {"int4": frozenset({"avx512vbmi", "avx512_vnni"}), "int8": frozenset({"avx512_vnni"})}


def fused(*tensors: torch.Tensor) -> bool:
    """Whether the fused decode ops (`rmsnorm`, `silu_mul`, `rope`, `decode_attention`) may take these tensors
    now: CPU, fp32 or bf16, the first one decode-sized, nothing autograd must see, not under torch.compile
    (inductor fuses those ops itself), the kernels built and not switched off (`ERNIE45_CPU_KERNELS=0`)."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in _FUSED_DTYPES or x.numel() > _FUSED_MAX:
        return False
    if torch.compiler.is_compiling():
        return False
    if needs_grad(*tensors):
        return False
    return _mode() != "0" and kernel() is not None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd must see an op on these tensors (then the kernels here, which have no backward, stay out)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_FUSED_MAX = 1 << 16  # elements of the first tensor: decode-sized; a prefill keeps torch's multi-threaded ops


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`layers.RMSNorm` in one call (x and weight of one dtype)."""
    return kernel().rmsnorm(x.contiguous(), weight.to(x.dtype).contiguous(), eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from [..., 2F] = gate | up, in gate_up's dtype, in one call."""
    return kernel().silu_mul(gate_up.contiguous())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_interleaved_rope` in one call: x [B, N, S, D] (last dim contiguous), cos/sin [B, S, D/2]."""
    shape = (x.shape[0], x.shape[2], x.shape[3] // 2)
    return kernel().rope(x, cos.float().expand(shape).contiguous(), sin.float().expand(shape).contiguous())


def attention_fits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes these shapes: one query, head dim a multiple of 16 up to 256, at most 16
    query heads per KV head, a bool mask (or none)."""
    b, h, s, d = q.shape
    return s == 1 and k.dtype == q.dtype and k.stride(-1) == 1 and heads_fit(h, k.shape[1], d, mask)


def heads_fit(heads: int, kv_heads: int, head_dim: int, mask: torch.Tensor | None) -> bool:
    """The head layout and mask `decode_attention` (and so `attention_block`) takes."""
    return (
        head_dim % 16 == 0 and head_dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 16
        and (mask is None or mask.dtype == torch.bool)
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, 1, D] over k, v [B, KV, L, D] (GQA), mask [B or 1, 1, 1, L] True = may
    attend; fp32 inside, out in q's dtype. The KV head's keys and values are read once for all its query heads."""
    return kernel().decode_attention(q.contiguous(), k, v, _allowed(mask, q.shape[0], k.shape[2]), scale)


def _allowed(mask: torch.Tensor | None, b: int, length: int) -> torch.Tensor:
    if mask is None:
        return torch.empty(0, dtype=torch.bool)
    return mask.expand(b, 1, 1, length).reshape(b, length).contiguous()


Weight = tuple[torch.Tensor, torch.Tensor, int]
"""A linear as the layer calls read it: (weights, int4 (scale, zero) pairs or an empty tensor, int4 group size)."""
Packed = tuple[list[torch.Tensor], list[int], list[float]]


def pack(*fields: torch.Tensor | Weight | int | float) -> Packed:
    """The layer calls' weights as an op schema carries them: tensors, ints and floats in three lists, each in the
    order of `fields` (a `Weight` as its tensors and group). The C++ side (`Packed` in csrc/layer_blocks.cpp) reads
    them back in the order of its structs' fields: AttentionWeights (norm, eps, qkv, o, scale), MlpWeights (norm,
    eps, gate_up, down), MoeWeights (norm, eps, router, bias, top_k, norm_min, shared gate_up, shared down, expert
    group size)."""
    tensors: list[torch.Tensor] = []
    ints: list[int] = []
    floats: list[float] = []
    for f in fields:
        if isinstance(f, torch.Tensor):
            tensors.append(f)
        elif isinstance(f, tuple):
            tensors += f[:2]
            ints.append(f[2])
        elif isinstance(f, int):
            ints.append(f)
        else:
            floats.append(float(f))
    return tensors, ints, floats


def attention_weights(norm: torch.Tensor, eps: float, qkv: Weight, o: Weight, scale: float) -> Packed:
    return pack(norm, eps, qkv, o, scale)


def mlp_weights(norm: torch.Tensor, eps: float, gate_up: Weight, down: Weight) -> Packed:
    return pack(norm, eps, gate_up, down)


def attention_block(h: torch.Tensor, weights: Packed, rope: tuple[torch.Tensor, torch.Tensor], slot: Slot,
                    mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """A decode step's attention half in one call: h [B, 1, E] + o(attention(rope(qkv(rmsnorm(h))))) with
    `weights` from `attention_weights`, this step's K and V written into the cache buffers where `slot` (a
    `kv_cache.Slot`) says."""
    kbuf, vbuf, start, write_at = slot
    cos, sin, allowed = _step_inputs(rope, mask, h.shape[0], kbuf.shape[3] // 2, start + 1)
    at = _NO_ROWS if write_at is None else write_at
    return kernel().attention_block(h.contiguous(), *weights, kbuf, vbuf, cos, sin, start, allowed, at)


_NO_ROWS = torch.empty(0, dtype=torch.long)


_last_step: list = [None, None]  # [key, value] of _step_inputs' one-entry memo


def _step_inputs(rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, b: int, half: int,
                 length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """cos, sin [b, 1, half] fp32 and the allowed positions [b, length] for the layer calls. Every layer of a step
    gets the same rope tensors and mask, so they are made once a step, not once a layer: each torch op between two
    layer calls costs ~10-20 us, the weights streamed in between having pushed Python's working set out of the
    caches. The memo holds its key's tensors, so an identity match cannot be a reused id."""
    key = (rope[0], rope[1], mask, b, half, length)
    last = _last_step[0]
    if last is not None and all(x is y for x, y in zip(key[:3], last[:3], strict=True)) and key[3:] == last[3:]:
        return _last_step[1]
    cos, sin = (t.float().expand(b, 1, half).contiguous() for t in rope)
    _last_step[:] = [key, (cos, sin, _allowed(mask, b, length))]
    return _last_step[1]


def dense_stack(
    h: torch.Tensor, weights: Packed, caches: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None, start: int, write_at: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A dense stack's decode step in one call: per layer h = attention half, then MLP half, with no Python between
    layers. `weights` packs each layer's `attention_weights` then `mlp_weights` fields, one layer after the other;
    `caches` holds each layer's K and V buffers (k0, v0, k1, v1, ...); every layer writes this token at `start` of
    its buffers (or row b at write_at[b])."""
    cos, sin, allowed = _step_inputs(rope, mask, h.shape[0], caches[0].shape[3] // 2, start + 1)
    at = _NO_ROWS if write_at is None else write_at
    return kernel().dense_stack(h.contiguous(), *weights, caches, cos, sin, start, allowed, at)


def mlp_block(h: torch.Tensor, weights: Packed) -> torch.Tensor:
    """A decode step's dense MLP half in one call: h [B, 1, E] + down(silu(gate) * up) of rmsnorm(h), `weights`
    from `mlp_weights`."""
    return kernel().mlp_block(h.contiguous(), *weights)


Experts = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]
"""A routed group's experts for `moe_block`: gate_up weights, their int4 scales (empty list: bf16), down weights,
their scales, the int4 group size. bf16 experts may come stacked instead: ([gate_up [X, 2I, H]], [], [down [X, H,
I]], [], 0); passing 2 x 64 list elements through the op call cost ~4% of a MoE layer's decode call."""
_NONE: Weight = (torch.empty(0), torch.empty(0), 0)


def moe_block(h: torch.Tensor, norm: torch.Tensor, eps: float, router, experts: Experts,
              shared: tuple[Weight, Weight] | None) -> torch.Tensor:  # fmt: skip
    """A decode step's MoE half in one call: h [B, 1, E] + shared(x) + the weighted sum of the experts the
    `router` (a `moe.Router`) picks for each row, x = rmsnorm(h). Only the picked experts' weights are read."""
    w1, s1, w2, s2, group = experts
    shared_gate_up, shared_down = shared or (_NONE, _NONE)
    weight, bias = router.weight.float(), router.e_score_correction_bias.float()
    packed = pack(norm, eps, weight, bias, router.top_k, router.norm_min, shared_gate_up, shared_down, group)
    return kernel().moe_block(h.contiguous(), *packed, w1, s1, w2, s2)


def usable(weight: torch.Tensor) -> bool:
    """Whether `weight` [N, K] fits the kernel (CPU, bf16, contiguous, K a multiple of 32)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and weight.shape[1] % K_MULTIPLE == 0
    )


def gemv(x2: torch.Tensor, weight: torch.Tensor, bf16_out: bool = False) -> torch.Tensor:
    """x2 [M <= MAX_ROWS, K] @ weight[N, K]^T in fp32, or rounded to bf16 (x2 is cast to bf16)."""
    return kernel().gemv_bf16(x2.to(torch.bfloat16).contiguous(), weight, bf16_out)


def gemv_int8(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ (qweight int8 [N, K] * scales [N] (fp32 or bf16))^T in fp32, x2 rounded to int8 per 32 columns
    inside (as for int4)."""
    return kernel().gemv_int8(x2.float().contiguous(), qweight, scales)


def gemv_int4(x2: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x2 [M, K] @ W^T in fp32, W in torch's CPU int4 tiles with bf16 (scale, zero) [K/group, N, 2] per group; x2
    rounded to int8 per 32 columns inside."""
    return kernel().gemv_int4(x2.float().contiguous(), tiles, scales_zeros.to(torch.bfloat16).contiguous(), group)


def _register_fakes() -> None:
    """Output shapes of the ops for tracing (torch.compile, FakeTensor), registered once."""
    if getattr(_register_fakes, "done", False):
        return
    lib = "ernie45::"

    def rows(x: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return x.new_empty((x.shape[0], n), dtype=dtype)

    fakes = {
        "gemv_bf16": lambda x, w, bf16_out: rows(x, w.shape[0], torch.bfloat16 if bf16_out else torch.float32),
        "gemv_int8": lambda x, w, scale: rows(x, w.shape[0]),
        "gemv_int4": lambda x, tiles, sz, group: rows(x, sz.shape[1]),
        "rmsnorm": lambda x, w, eps: torch.empty_like(x),
        "silu_mul": lambda gu: gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2)),
        "rope": lambda x, cos, sin: x.new_empty(x.shape),
        "decode_attention": lambda q, k, v, allowed, scale: torch.empty_like(q, memory_format=torch.contiguous_format),
        "attention_block": lambda h, *rest: h.new_empty(h.shape),
        "mlp_block": lambda h, *rest: h.new_empty(h.shape),
        "dense_stack": lambda h, *rest: h.new_empty(h.shape),
        "moe_block": lambda h, *rest: h.new_empty(h.shape),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(lib + name)(fake)
    _register_fakes.done = True
