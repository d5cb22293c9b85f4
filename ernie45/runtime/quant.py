"""Weight-only quantization on torch's packed kernels: int8 per output channel, int4 in groups of 32/64/128.

`quantize(model, bits)` swaps every eligible `nn.Linear` (attention, dense and shared MLPs, optionally the
LM head) for a `QuantLinear`, and each routed expert group's stacked weights for per-expert quantized
matrices. Activations stay in the model's float dtype (but see int8 decode below); only the weights shrink
(int8: 1 byte, int4: half a byte per weight, plus one scale (and zero) per channel or group).

CPU kernels: for decode (a few rows) ernie45's own (`kernels`: int8 and int4 where the CPU has AVX512-BF16 and
VNNI (int4 also VBMI), x rounded to int8 per 32 columns as llama.cpp's Q8_0 rounds it); for prefill a bf16
matmul on the weight dequantised for that call. Where the own int8 kernel does not run, int8 weights the engine
has prepared (`prepare_fbgemm_int8`: CPUs with VNNI) go through FBGEMM's int8 x int8 product for any number of
rows, each row quantized to 8 bits per call; else `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm_for_cpu`.
CUDA: the same int8 kernel and `torch._weight_int4pack_mm`. Dequantised weights are kept nowhere.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model.moe import ExpertGroup
from ..model.trunk import ENCODER_MODULES
from . import kernels
from .packed import bf16_matmul_in_fp32, clearly_faster

GROUP_SIZES = (32, 64, 128)
# up to this many rows a CPU matmul takes the packed kernel, above it a bf16 matmul on the dequantised weight
# (measured crossovers: docs/performance.md, "Measurements behind the code")
PACKED_ROWS = {8: 32, 4: 256}
KERNEL_CHUNK = 1024  # prefill rows one int4 kernel call takes (its per-thread buffers grow with the rows)
CPU_INT4_BLOCK = 64  # torch's CPU int4 tiles: 64 output rows, each byte one column of rows j and j + 32


def cpu_int4_tiles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (N a multiple of 64) -> torch's CPU int4 tiles, the bytes that
    `_convert_weight_to_int4pack_for_cpu` makes, as [N, K/2] uint8, in byte arithmetic: that converter first widens
    every code to int32, four times the memory traffic."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // CPU_INT4_BLOCK, 2, CPU_INT4_BLOCK // 2, k)  # rows j and j + 32 of a tile
    return _unviewed((c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).contiguous(), (n, k // 2))


@lru_cache(maxsize=1)
def torch_reads_cpu_int4_tiles() -> bool:
    """Whether torch's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`) reads the 64-row tiles that `cpu_int4_tiles`
    makes. torch tiles by four of its vector widths: 64 rows where it is built for AVX-512, but 32 on an AVX2-only
    CPU (a Zen 3 EPYC), whose bytes its kernel would then misread; there int4 takes no route through it."""
    codes = torch.arange(64 * 64, dtype=torch.int32).remainder(13).view(64, 64)
    try:
        return torch.equal(torch._convert_weight_to_int4pack_for_cpu(codes, 1).view(64, 32), cpu_int4_tiles(codes))
    except (RuntimeError, NotImplementedError):
        return False


def _unviewed(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Contiguous `t`'s bytes as a tensor of `shape` that is no view: a view keeps its base tensor alive, and with it
    the old storage after `hugepages.gather` has moved the view into its arena (`set_`), which doubled the memory
    of a loaded 21B model."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), shape)


def _tile_codes(tiles: torch.Tensor) -> torch.Tensor:
    """Tiles [N/64, K, 32] uint8 -> each 64-row block's codes 0..15, [N/64, K, 64] (rows j, then j + 32)."""
    return torch.cat([tiles & 15, tiles >> 4], dim=-1)


def codes_of_cpu_int4_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `cpu_int4_tiles`: tiles [N/64, K, 32] uint8 -> codes 0..15 [N, K] uint8."""
    blocks, k, _ = tiles.shape
    return _tile_codes(tiles).transpose(1, 2).reshape(blocks * CPU_INT4_BLOCK, k)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], scales [N]): symmetric, one scale per output channel."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes 0..15 int32 [N, K], scales_and_zeros [K/group, N, 2]): asymmetric per group.

    The kernels read w ≈ (code - 8) * scale + zero, so zero is the group's minimum plus 8 steps.
    """
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input width ({k}) to be a multiple of the group size {group}")
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    zeros = lo + 8 * scale
    return codes, torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous()


def fbgemm_int8_available() -> bool:
    """FBGEMM's int8 product runs here at full 8-bit range (VNNI; without it the row must lose a bit)."""
    vnni = {"avx512_vnni", "avx_vnni"} & kernels._cpu_flags()
    return torch.backends.quantized.engine in ("x86", "fbgemm") and bool(vnni)


@lru_cache(maxsize=1)
def int8_many_rows_dequantised() -> bool:
    """Whether many bf16 rows (prefill) multiply an int8 weight faster dequantised (a bf16 or widened matmul) than
    on torch's int8 kernel here. Measured once (~30 ms), not assumed: on an AMD EPYC without AMX the dequantised
    product was 2-2.5x faster at 48-512 rows (docs/performance.md, "int8 prefill"); the Intel part with AMX where
    the crossovers were first set kept torch's kernel for bf16 rows."""
    q = QuantLinear.from_float(torch.randn(1024, 1024, dtype=torch.bfloat16), None, 8)
    x = torch.randn(192, 1024, dtype=torch.bfloat16)
    return clearly_faster(lambda: q._dequantised(x), lambda: q._int8(x))


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 per channel or packed int4 per group."""

    dynamic = None  # int8 prepared for FBGEMM (CPU): its packing of the codes (which then live only there)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, bits: int,
                 group: int = 32, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        """codes: int8 [N, K] (bits 8), or 0..15 integers [N, K] or torch's CPU tiles of them [N/64, K, 32] uint8
        (bits 4: `cpu_int4_tiles`, as a quantized file stores them); scales: [N] or [K/group, N, 2]."""
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and group not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group}")
        self.bits, self.group, self.dtype = bits, group, dtype
        tiles = bits == 4 and codes.dim() == 3
        if tiles and (codes.dtype != torch.uint8 or codes.shape[2] != CPU_INT4_BLOCK // 2):
            raise ValueError(f"int4 tiles must be uint8 [N/64, K, 32], got {codes.dtype} {list(codes.shape)}")
        n, k = (codes.shape[0] * CPU_INT4_BLOCK, codes.shape[1]) if tiles else codes.shape
        self.out_features, self.in_features = n, k
        if bits == 8:
            # an owned copy: a view into a memory-mapped file can sit at an address the bf16 kernel cannot load
            self.register_buffer("qweight", codes.to(torch.int8, copy=True).contiguous())
            self.register_buffer("scales", scales.to(dtype))
        else:
            cpu = codes.device.type == "cpu"
            if tiles and not cpu:
                codes, tiles = codes_of_cpu_int4_tiles(codes), False
            if tiles:  # already the kernel's bytes: taken as they are
                packed = _unviewed(codes.contiguous(), (self.out_features, self.in_features // 2))
            elif cpu and self.out_features % CPU_INT4_BLOCK == 0:
                packed = cpu_int4_tiles(codes)
            elif cpu:
                packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            else:
                codes = codes.to(torch.int32)
                packed = torch._convert_weight_to_int4pack(((codes[:, 1::2] << 4) | codes[:, ::2]).to(torch.uint8), 8)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", scales.to(torch.bfloat16))  # what the kernels read: no cast per call
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        self._chosen = False  # the routes are picked at first use (building or loading never builds the kernels)

    def _choose(self) -> None:
        """Pick, once, how this linear multiplies for its device, width, dtype and this CPU's kernels: `_decode`
        for up to `kernels.MAX_ROWS` rows, `_many` for more than `PACKED_ROWS` (prefill), `_rows` otherwise (on an
        AVX512 build the int4 kernel takes every row count).
        Run again where those change (a move to another device, FBGEMM packing)."""
        self._chosen = True
        cpu = self.codes().device.type == "cpu" if self.dynamic is None else True
        self._tiles = None
        if self.dynamic is not None:  # any row count: as fast as dequantising even at 512 prefill rows
            self._decode = self._many = self._rows = self._fbgemm
            return
        if self.bits == 8 and self.in_features % 16:
            # torch's int8-pack matmul reads past the row for a width that is not a multiple of 16 (it crashed
            # the process at widths 8, 24, 40, 56 and 72 here): such a linear multiplies its dequantised weight
            self._decode = self._many = self._rows = self._dequantised
            return
        if self.bits == 8:
            self._rows = self._int8_cpu if cpu and self.dtype == torch.float32 else self._int8
        elif cpu and self._unpackable() and not torch_reads_cpu_int4_tiles():
            self._rows = self._dequantised  # torch's kernel would misread the tiles here
        else:
            self._rows = self._int4_cpu if cpu else self._int4_cuda
        # CPU prefill: a bf16 matmul on the dequantised weight beats the packed kernels for many rows
        many = cpu and (self._unpackable() or self.bits == 8 and (self.dtype == torch.float32
                                                                    or int8_many_rows_dequantised()))  # fmt: skip
        self._many = self._dequantised if many else self._rows
        self._decode = self._rows
        if cpu and self._own_int8():
            self._tiles = (self.qweight, self.scales, 0)
            self._decode = self._int8_kernel
        elif cpu and self.bits == 4 and self._unpackable() and kernels.ready("int4"):
            self._tiles = (self.qweight, self.scales, self.group)
            self._decode = self._int4_kernel
            if kernels.isa() == "avx512":  # there the VNNI kernel also beats both prefill routes at 16-1024 rows
                self._rows = self._many = self._int4_kernel  # (docs/performance.md: "int4 prefill on the VNNI...")

    def _own_int8(self) -> bool:
        """Whether ernie45's int8 decode kernel takes this linear's rows (its codes in place, a width it reads)."""
        return self.bits == 8 and self.qweight is not None and self.in_features % 64 == 0 and kernels.ready("int8")

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._chosen = False  # a move to another device changes the routes
        return out

    def prepare_fbgemm_int8(self) -> bool:
        """Repack int8 codes for FBGEMM's int8 x int8 product (CPU, VNNI): for one row faster than torch's int8
        kernel and for 512 no slower than the dequantised bf16 matmul (docs/performance.md), each row quantized to
        8 bits per call (not weight-only any more: the engine's choice; `benchmarks/quant_quality.py --decode`
        reports what it costs). Reading the codes back (`codes()`) is slow: for saving, not for compute.
        Returns whether it did."""
        if self.bits != 8 or self.dynamic is not None or self.qweight.device.type != "cpu" or self._own_int8():
            return False  # (ernie45's own int8 kernel decodes faster than FBGEMM, from the codes as they are)
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        try:  # torch's quantized tensors are deprecated: when they go, int8 keeps torch's own kernels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(self.qweight, self.scales.double(), zeros, 0)
                self.dynamic = torch.ops.quantized.linear_prepack(q, None)
        except (AttributeError, RuntimeError, NotImplementedError):
            return False
        self.qweight = None  # one copy of the codes: codes() reads them back from the packing
        self._chosen = False
        return True

    def codes(self) -> torch.Tensor:
        """int8 [N, K] (bits 8) or the kernel's packed int4 codes."""
        if self.dynamic is not None:
            return torch.ops.quantized.linear_unpack(self.dynamic)[0].int_repr()
        return self.qweight

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group: int = 32) -> QuantLinear:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        codes, scales = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group)
        return cls(codes, scales, bias, bits=bits, group=group, dtype=dtype)

    @staticmethod
    def stackable(*parts: QuantLinear) -> bool:
        """Whether `stack` takes these: same bits, group, dtype and input width, biases all or none, not yet
        packed for FBGEMM."""
        first = parts[0]
        return all(
            p.bits == first.bits and p.group == first.group and p.dtype == first.dtype and p.dynamic is None
            and p.in_features == first.in_features and (p.bias is None) == (first.bias is None)
            for p in parts
        )  # fmt: skip

    @classmethod
    def stack(cls, *parts: QuantLinear) -> QuantLinear:
        """One QuantLinear whose output rows are the parts' one under the other (fusing q/k/v or gate/up of a
        loaded quantized checkpoint): the codes and scales move as they are, so outputs are the parts' exactly."""
        codes, scales = zip(*(p.portable() for p in parts), strict=True)
        first = parts[0]
        bias = None if first.bias is None else torch.cat([p.bias.detach() for p in parts])
        scales_dim = 0 if first.bits == 8 else 1  # [N] per channel, or [K/group, N, 2]
        return cls(
            torch.cat(codes), torch.cat(scales, scales_dim), bias, bits=first.bits, group=first.group, dtype=first.dtype
        )

    def portable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) in the device-independent form `__init__` takes (for saving).

        int4's packed tile layout is the kernel's own; the codes are read back through the kernel itself
        (x = identity gives the dequantised W^T exactly), so no second copy is ever kept.
        """
        if self.bits == 8:
            return self.codes(), self.scales.float()
        sz = self.scales.float()
        if self._unpackable():
            return codes_of_cpu_int4_tiles(self.cpu_tiles()), sz
        eye = torch.eye(self.in_features, dtype=self.dtype, device=self.qweight.device)
        w = self.forward_nobias(eye).float().T  # [N, K]
        scale = sz[..., 0].T.repeat_interleave(self.group, dim=1)  # [N, K]
        zero = sz[..., 1].T.repeat_interleave(self.group, dim=1)
        codes = torch.round((w - zero) / scale + 8).clamp(0, 15).to(torch.uint8)
        return codes, sz

    def _unpackable(self) -> bool:
        """Whether the int4 tiles are torch's CPU layout, which `_cpu_int4_codes` reads directly."""
        return self.bits == 4 and self.qweight.device.type == "cpu" and self.out_features % CPU_INT4_BLOCK == 0

    def _cpu_int4_codes(self) -> torch.Tensor:
        """The int4 codes 0..15 as uint8 [K, N] (W^T's layout), unpacked from the CPU kernel's tiles."""
        return _tile_codes(self.cpu_tiles()).permute(1, 0, 2).reshape(self.in_features, self.out_features)

    def cpu_tiles(self) -> torch.Tensor | None:
        """int4 in torch's CPU tile layout: the tiles as [N/64, K, 32] uint8 (a view, no copy; what a quantized
        file stores, so loading it takes them as they are), else None."""
        if not self._unpackable():
            return None
        return self.qweight.view(self.out_features // CPU_INT4_BLOCK, self.in_features, CPU_INT4_BLOCK // 2)

    def kernel_weight(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """How ernie45's fused decode calls read this linear: int4 (tiles, scales, group) or int8 (codes, scales, 0)
        where its int4 or int8 kernel takes it (chosen with the module's routes), else None."""
        if not self._chosen:
            self._choose()
        return self._tiles

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in `dtype`, on any device and layout (for export)."""
        codes, scales = self.portable()
        if self.bits == 8:
            return (codes.float() * scales.float()[:, None]).to(dtype)
        sz = scales.float().repeat_interleave(self.group, dim=0)  # [K, N, 2]
        return ((codes.float() - 8) * sz[..., 0].T + sz[..., 1].T).to(dtype)

    def dequantized_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T [K, N] in `dtype`, made for one call (prefill) and dropped after it."""
        if self.bits == 8:
            return (self.codes().to(dtype) * self.scales.to(dtype)[:, None]).T
        sz = self.scales.to(dtype)[:, None]  # [K/group, 1, N, 2]: one scale and zero per group, broadcast
        k, n = self.in_features, self.out_features
        codes = self._cpu_int4_codes().view(k // self.group, self.group, n).to(dtype)
        return ((codes - 8) * sz[..., 0] + sz[..., 1]).view(k, n)

    def forward_nobias(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] @ W^T by the route chosen for M rows (`_choose`)."""
        if not self._chosen:
            self._choose()
        m = x2.shape[0]
        if m <= kernels.MAX_ROWS:
            return self._decode(x2)
        return self._many(x2) if m > PACKED_ROWS[self.bits] else self._rows(x2)

    # ---- the routes (`_choose` picks among them) ----
    def _fbgemm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self.dynamic, False).to(x2.dtype)

    def _dequantised(self, x2: torch.Tensor) -> torch.Tensor:
        wide = x2.device.type == "cpu" and bf16_matmul_in_fp32()  # bf16 slower than fp32 here (`packed`)
        dtype = torch.float32 if wide else torch.bfloat16
        return (x2.to(dtype) @ self.dequantized_t(dtype)).to(x2.dtype)

    def _int8_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return kernels.gemv_int8(x2, self.qweight, self.scales).to(x2.dtype)

    def _int4_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] > KERNEL_CHUNK:  # the kernel keeps its rounded rows per thread: at most a chunk's
            return torch.cat([self._int4_kernel(part) for part in x2.split(KERNEL_CHUNK)])
        return kernels.gemv_int4(x2, *self._tiles).to(x2.dtype)

    def _int8_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        """fp32 rows go through the CPU int8 kernel as bf16 rows, where it is an order of magnitude faster."""
        if x2.dtype != torch.float32:
            return self._int8(x2)
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales.to(torch.bfloat16)).float()

    def _int8(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.qweight, self.scales.to(x2.dtype))

    def _int4_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        """bf16 rows: torch's CPU int4 kernel is far faster on them than on fp32 rows (docs/performance.md)."""
        xb = x2.to(torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group, self.scales.to(torch.bfloat16)).to(
            x2.dtype
        )

    def _int4_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.qweight, self.group, self.scales).to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.requires_grad and torch.is_grad_enabled():  # training through a frozen quantized base (LoRA)
            y = _FrozenMatmul.apply(x.reshape(-1, shape[-1]), self)
        else:
            y = self.forward_nobias(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        tail = f", group={self.group}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{tail}"


class _FrozenMatmul(torch.autograd.Function):
    """x W^T by the layer's kernels forward; backward gives x its gradient through the dequantised weight (the
    codes themselves are frozen: they get none). What LoRA on a quantized base needs, and no kernel has."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.forward_nobias(x2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dense_weight(grad.dtype), None


class QuantExpertGroup(ExpertGroup):
    """An expert group whose experts are QuantLinear pairs; tokens run expert by expert (only experts hit)."""

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.sorted_experts(x, ids, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.q_gate_up[e](x)
        if kernels.fused(gate_up):  # decode rows: SwiGLU's product in one call, as the dense layers do
            return self.q_down[e](kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.q_down[e](F.silu(gate) * up)

    def decode_experts(self, x: torch.Tensor) -> kernels.Experts | None:
        """The experts' int4 tiles or int8 codes where ernie45's kernel reads every one of them here and now, else
        None."""
        if not (kernels.ready("int4") or kernels.ready("int8")) or kernels.needs_grad(x):
            return None
        if getattr(self, "_decode_experts", False) is False:  # made once: 2 x 64 lookups per layer and step
            mats = [*self.q_gate_up, *self.q_down]
            # (matrices wrapped with LoRA adapters run through their modules, adapters included)
            tiles = [m.kernel_weight() if isinstance(m, QuantLinear) else None for m in mats]
            groups = {t[2] for t in tiles if t is not None}
            self._decode_experts = None
            if None not in tiles and len(groups) == 1:
                up, down = tiles[: len(self.q_gate_up)], tiles[len(self.q_gate_up) :]
                self._decode_experts = ([t[0] for t in up], [t[1] for t in up], [t[0] for t in down],
                                        [t[1] for t in down], groups.pop())  # fmt: skip
        return self._decode_experts


def install_experts(model: nn.Module, name: str, gate_up: list[QuantLinear], down: list[QuantLinear]) -> None:
    """Put a QuantExpertGroup where `model` holds the expert group `name`: its router, and these per-expert
    matrices instead of the stacked weights (the old module is left as it was)."""
    group = model.get_submodule(name)
    new = QuantExpertGroup.__new__(QuantExpertGroup)
    nn.Module.__init__(new)
    new.gate, new.num_experts = group.gate, group.num_experts
    new.q_gate_up, new.q_down = nn.ModuleList(gate_up), nn.ModuleList(down)
    _put(model, name, new)


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _quantize_group(model: nn.Module, name: str, group: ExpertGroup, bits: int, size: int) -> None:
    gate_up, down = group.gate_up_proj.data, group.down_proj.data
    experts = range(group.num_experts)
    install_experts(model, name, [QuantLinear.from_float(gate_up[e], None, bits, size) for e in experts],
                    [QuantLinear.from_float(down[e], None, bits, size) for e in experts])  # fmt: skip


@torch.no_grad()
def quantize(model: nn.Module, bits: int, group_size: int = 32, lm_head: bool = False, experts: bool = True,
             encoders: bool = False, progress: bool = True) -> nn.Module:  # fmt: skip
    """Quantize `model` in place (text trunk linears; the LM head (always int8), experts and media encoders by
    choice). progress: a bar on stderr while it works, where stderr is a terminal. What is quantized already
    (a layer quantized while loading: `quantize_modules`) is left as it is."""
    quantize_modules(model, bits, group_size, lm_head, experts, encoders, progress)
    model.config.ernie45_quantization = {"bits": bits, "group_size": group_size, "lm_head": lm_head}
    return model


@torch.no_grad()
def quantize_modules(model: nn.Module, bits: int, group_size: int = 32, lm_head: bool = False,
                     experts: bool = True, encoders: bool = False, progress: bool = True) -> nn.Module:  # fmt: skip
    """`quantize` on any module (a decoder layer as soon as its weights are loaded), without touching a config."""
    skip = () if encoders else ENCODER_MODULES
    targets = []
    for name, module in list(model.named_modules()):
        if any(s in name for s in skip):
            continue
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                if full.endswith("lm_head") and not lm_head:
                    continue
                targets.append((module, child_name, child))
    groups = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, ExpertGroup) and not isinstance(m, QuantExpertGroup) and not any(s in n for s in skip)
    ]
    bar = tqdm(total=len(targets) + len(groups), desc=f"quantizing to int{bits}", unit="matrix",
               disable=None if progress else True)  # fmt: skip
    for name, group in groups:
        _, width, hidden = group.gate_up_proj.shape
        if experts and (bits == 8 or (hidden % group_size == 0 and width // 2 % group_size == 0)):
            _quantize_group(model, name, group, bits, group_size)
        bar.update()
    for parent, child_name, child in targets:
        bar.update()
        # the LM head goes to int8 at any width: it is the largest single read of a decode step (a 100k-token
        # vocabulary), and its errors land straight on the logits (llama.cpp keeps its output tensor above 4 bits)
        head = child_name == "lm_head"
        if bits == 4 and not head and child.in_features % group_size:
            continue  # a width the int4 kernel cannot tile stays in float
        b = 8 if head else bits
        setattr(parent, child_name, QuantLinear.from_float(child.weight.data, child.bias, b, group_size))
    bar.close()
    return model


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Undo `quantize` in place: every QuantLinear back to an nn.Linear and every quantized expert group back to
    stacked weights, holding the dequantised values (what the quantized model computes with) in `dtype`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantExpertGroup):
            plain = ExpertGroup.__new__(ExpertGroup)
            nn.Module.__init__(plain)
            plain.gate, plain.num_experts = module.gate, module.num_experts
            plain.gate_up_proj = nn.Parameter(torch.stack([m.dense_weight(dtype) for m in module.q_gate_up]),
                                              requires_grad=False)  # fmt: skip
            plain.down_proj = nn.Parameter(torch.stack([m.dense_weight(dtype) for m in module.q_down]),
                                           requires_grad=False)  # fmt: skip
            _put(model, name, plain)
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")  # fmt: skip
                linear.weight = nn.Parameter(child.dense_weight(dtype), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
                setattr(module, child_name, linear)
    if getattr(model.config, "ernie45_quantization", None) is not None:
        del model.config.ernie45_quantization
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantExpertGroup)) for m in model.modules())


def prepare_fbgemm_int8(model: nn.Module) -> int:
    """Every CPU int8 QuantLinear of `model` onto FBGEMM's int8 product (where VNNI runs it); returns
    how many."""
    if not fbgemm_int8_available():
        return 0
    return sum(m.prepare_fbgemm_int8() for m in model.modules() if isinstance(m, QuantLinear))
