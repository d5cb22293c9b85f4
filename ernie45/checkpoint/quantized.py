"""Weight-only quantized checkpoints (`ernie45 quantize`): the ernie45 layout, with each quantized matrix
stored as device-independent codes plus scales, and `config.json` saying how (`ernie45_quantization`).

int4 codes are stored with bf16 scales and zeros (what the kernels read), ~0.56 bytes a weight: a linear whose
output width is a multiple of 64 as torch's CPU int4 tiles ([N/64, K, 32] uint8: each byte holds column k of rows
j and j + 32 of a 64-row block), which a CPU load takes as they are, the others two to a byte along the input
(`"int4_codes": "tiles64"`; files of `"packed"` hold only the latter and load too). Repacking codes into tiles
was most of a second start's time (docs/performance.md, "Second start from the tiles"). The token embedding (a
third of a small model's bytes) is stored as int8 per row and widened on load, as llama.cpp quantizes its token
table; the other float parts (norms, encoders) keep the source checkpoint's dtype. A head tied to the embedding is
not stored: its int8 per channel is the embedding's int8 per row, the same codes and scales, which loading takes
for both (quantizing the widened table again was most of a load's time).

Files are written in shards of ~2 GB with the official index (`model.safetensors.index.json`) once the weights
pass that size. Loading builds the model on the meta device, puts a `QuantLinear` where the file holds codes, and
fills the remaining (float) parameters, reading each tensor from its shard only when it is placed: the float
weights of quantized layers never exist, and the file is never held whole. On the CPU the shards are mapped
instead (`hugepages.map_file`) and the int4 tiles and their scales are used where they lie in the mapping: the
weights take no memory of the process's own, and a second start finds them in the page cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.trunk import Ernie45PreTrainedModel
from ..runtime import hugepages
from ..runtime.quant import CPU_INT4_BLOCK, QuantLinear, install_experts, quantize_int8
from .files import CheckpointError, SafetensorsFile, weight_files, written_atomically

KEY = "ernie45_quantization"
ROUTER = ("gate.weight", "e_score_correction_bias")  # fp32 always
EMBED = "model.embed_tokens.weight"


SHARD_BYTES = 2 * 2**30  # the official checkpoints' shards are a few GB each too


def save_quantized(model: nn.Module, out: str | Path, float_dtype: torch.dtype | None = None,
                   shard_bytes: int = SHARD_BYTES) -> Path:  # fmt: skip
    """Write a model quantized by `ernie45.runtime.quant.quantize` (config.json + its weights); float parameters in
    `float_dtype` (default: as they are). Tensors are made portable one module at a time and written in shards of
    about `shard_bytes` (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`; one file,
    `model.safetensors`, when they fit one), so saving a 21B model holds one shard's copies at most."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tied_head = model.config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), QuantLinear)
    spec = dict(getattr(model.config, KEY))
    spec.update(int4_codes="tiles64", tied_head_from_embedding=bool(tied_head), embedding="int8")
    with written_atomically(out) as tmp:
        shards = _ShardWriter(tmp, shard_bytes)
        for name, tensor in _portable_tensors(model, float_dtype, tied_head):
            shards.add(name, tensor)
        shards.close()
        setattr(model.config, KEY, spec)
        if float_dtype is not None:
            model.config.dtype = float_dtype
        model.config.save_pretrained(tmp)
    return out


def _portable_tensors(model: nn.Module, float_dtype: torch.dtype | None, tied_head: bool):
    """(name, CPU tensor) for everything the file holds, made one at a time: each quantized linear's codes (int4
    as tiles or packed two to a byte) and scales, the token table in int8 per row, the float parameters."""
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized.add(name)
            if tied_head and name == "lm_head":
                continue  # made again from the embedding on load
            tiles = module.cpu_tiles() if module.bits == 4 else None
            if tiles is not None:  # the kernel's own bytes: the load takes them as they are
                codes, scales = tiles, module.scales.to(torch.bfloat16)
            else:
                codes, scales = module.portable()
                if module.bits == 4:
                    codes, scales = _pack(codes), scales.to(torch.bfloat16)
            yield f"{name}.codes", codes.contiguous().cpu()
            yield f"{name}.scales", scales.contiguous().cpu()
            if module.bias is not None:
                yield f"{name}.bias", module.bias.data.contiguous().cpu()
    for name, p in model.named_parameters():
        if name == EMBED:
            codes, scales = quantize_int8(p.data)
            yield f"{EMBED}.codes", codes.contiguous().cpu()
            yield f"{EMBED}.scales", scales.contiguous().cpu()
        elif name.rpartition(".")[0] not in quantized:
            t = p.data
            if float_dtype is not None and t.is_floating_point() and not name.endswith(ROUTER):
                t = t.to(float_dtype)
            yield name, t.contiguous().cpu()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _ShardWriter:
    """Tensors gathered until a shard is full, then written; named and indexed at the end (the count is known then)."""

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out, self.limit = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []  # the keys of each written shard
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f"part-{len(self.files)}"
        save_file(self.pending, path, metadata={"format": "pt"})
        path.chmod(0o666 & ~_umask())  # safetensors writes 0600: a model served by another account could not read it
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0
        hugepages.trim()  # the shard's portable copies back to the OS

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.out / "part-0").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{i}").rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes 0..15 [N, K] -> uint8 [N, K/2], column 2j in the low nibble, 2j + 1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, ::2] | (c[:, 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def load_quantized(path: Path, model: nn.Module, dtype: torch.dtype | None, device, mapped: bool = True) -> nn.Module:
    """Fill `model` (built on meta from a quantized checkpoint's config) from `path`; mapped: on the CPU, use the
    int4 tiles and scales where they lie in the mapped files (False: read them into the process's memory)."""
    spec = getattr(model.config, KEY)
    bits, group = spec["bits"], spec["group_size"]
    packed = spec.get("int4_codes") in ("packed", "tiles64")  # (tiles are told apart by their shape)
    sd = _Tensors(path, device, mapped=mapped)
    float_dtype = dtype or next((t for k, t in sd.dtypes() if t.is_floating_point
                                 and not k.endswith((*ROUTER, ".scales"))), torch.float32)  # fmt: skip

    head = None
    if f"{EMBED}.codes" in sd:  # int8 per row, widened to the float dtype
        codes, scales = sd.pop(f"{EMBED}.codes"), sd.pop(f"{EMBED}.scales")
        sd[EMBED] = (codes.float() * scales.float()[:, None]).to(float_dtype)
        if spec.get("tied_head_from_embedding"):  # the tied head's int8 per channel: these very codes and scales
            head = QuantLinear(codes, scales, None, bits=8, group=group, dtype=float_dtype)

    def quant(name: str, shape: tuple[int, ...]) -> QuantLinear:
        """The linear `name` of weight shape (out, in), its codes and scales checked against that shape (a file that
        does not match would load, then fail every request)."""
        if f"{name}.codes" not in sd or f"{name}.scales" not in sd:
            raise CheckpointError(f"quantized checkpoint {path} lacks {name}.codes or {name}.scales")
        codes, scales = sd.pop(f"{name}.codes"), sd.pop(f"{name}.scales")
        width = 8 if codes.dtype == torch.int8 else bits  # int8 codes are signed, int4 ones 0..15 (the head: int8)
        n, k = shape
        tiles = width == 4 and codes.dim() == 3
        int4 = (n // CPU_INT4_BLOCK, k, CPU_INT4_BLOCK // 2) if tiles else (n, k // 2) if packed else (n, k)
        want = (int4, (k // group, n, 2)) if width == 4 else ((n, k), (n,))
        odd = (width == 4 and k % group) or (tiles and n % CPU_INT4_BLOCK)
        if (tuple(codes.shape), tuple(scales.shape)) != want or odd:
            raise CheckpointError(
                f"quantized checkpoint {path}: {name} has codes {tuple(codes.shape)} and scales "
                f"{tuple(scales.shape)}; a {n}x{k} int{width} linear needs {want[0]} and {want[1]}"
            )
        if width == 4 and packed and not tiles:
            codes = _unpack(codes)
        return QuantLinear(codes, scales, sd.pop(f"{name}.bias", None), bits=width, group=group,
                           dtype=float_dtype)  # fmt: skip

    for i, name in enumerate(sorted({k[: -len(".codes")] for k in sd if k.endswith(".codes")})):
        parent_name, _, leaf = name.rpartition(".")
        if parent_name.endswith((".q_gate_up", ".q_down")):
            continue  # expert stacks: built per group below
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized checkpoint {path} holds {name}, which the model does not have") from None
        model.get_submodule(parent_name)._modules[leaf] = quant(name, tuple(linear.weight.shape))
        if i % 64 == 63:
            hugepages.trim()
    for name, module in list(model.named_modules()):
        if f"{name}.q_gate_up.0.codes" in sd:
            experts = range(module.num_experts)
            up, down = tuple(module.gate_up_proj.shape[1:]), tuple(module.down_proj.shape[1:])
            install_experts(model, name, [quant(f"{name}.q_gate_up.{e}", up) for e in experts],
                            [quant(f"{name}.q_down.{e}", down) for e in experts])  # fmt: skip
            # each code was read, unpacked and widened on its way into the kernels' layout: hand those buffers
            # back to the OS (glibc keeps them, and a 21B model's layers then left ~10 GB of them: OOM at 24 GB)
            hugepages.trim()
    missing = []
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name not in sd:
            missing.append(name)
            continue
        t = sd.pop(name)
        if t.dtype.is_floating_point and not name.endswith(ROUTER):
            t = t.to(float_dtype)
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    if missing or sd:
        raise CheckpointError(f"quantized checkpoint {path} does not fit its config: missing {missing[:5]}, "
                              f"unexpected {list(sd)[:5]}")  # fmt: skip
    if head is not None:
        model.lm_head = head
    elif spec.get("tied_head_from_embedding"):  # (the embedding stored in float)
        model.lm_head = QuantLinear.from_float(model.model.embed_tokens.weight.data, None, 8, group)
    elif model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = float_dtype
    return model


class _Tensors:
    """A quantized checkpoint's tensors, each read from its file only when taken (`pop`): loading holds the model
    and one tensor in flight, never the whole file (a 21B int4 file is ~12 GB). With `mapped`, the files are mapped
    (`hugepages.map_file`): the uint8 tiles and the int4 scales are used where they lie, the rest copied out."""

    def __init__(self, path: Path, device, mapped: bool = False) -> None:
        files, _ = weight_files(path, allow_pickle=False)
        self.where = {key: st for st in map(SafetensorsFile, files) for key in st.keys()}
        self.ready: dict[str, torch.Tensor] = {}
        self.device = device
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.maps: dict[Path, torch.Tensor] | None = {} if mapped and on_cpu else None

    def dtypes(self) -> Iterator[tuple[str, torch.dtype]]:
        yield from ((k, st.dtype_shape(k)[0]) for k, st in self.where.items())

    def __contains__(self, key: str) -> bool:
        return key in self.ready or key in self.where

    def __iter__(self) -> Iterator[str]:
        return iter([*self.ready, *self.where])

    def __len__(self) -> int:
        return len(self.ready) + len(self.where)

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        self.ready[key] = tensor

    def pop(self, key: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        if key in self.ready:
            return self.ready.pop(key)
        if key not in self.where:
            return default
        st = self.where.pop(key)
        if self.maps is not None:
            if st.path not in self.maps:
                self.maps[st.path] = hugepages.map_file(st.path)
            t = st.view(key, self.maps[st.path])
            if t is not None:  # the rest copied out of the mapping, not read: a read caches the file in small pieces
                return t if self._used_as_stored(key, st) else t.clone()
        t = st.read(key)
        return t if self.device is None or str(self.device) == "cpu" else t.to(self.device)

    @staticmethod
    def _used_as_stored(key: str, st: SafetensorsFile) -> bool:
        """int4 tiles (uint8, 3-d) and their bf16 scales and zeros (3-d): what the CPU kernels read as the file
        holds them (int8 codes and float weights are copied or widened on their way in anyway)."""
        dtype, shape = st.dtype_shape(key)
        return len(shape) == 3 and (
            (key.endswith(".codes") and dtype == torch.uint8) or (key.endswith(".scales") and dtype == torch.bfloat16)
        )


def _from_pretrained(path, dtype: torch.dtype | None, device):
    from .load import load

    return load(path, dtype=dtype, device=device)


Ernie45PreTrainedModel.quantized_loader = staticmethod(_from_pretrained)
