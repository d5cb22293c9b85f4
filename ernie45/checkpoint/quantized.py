"""Weight-only quantized checkpoints (`ernie45 quantize`): the ernie45 layout, with each quantized matrix
stored as device-independent codes plus scales, and `config.json` saying how (`ernie45_quantization`).

int4 codes are stored two to a byte (`"int4_codes": "packed"`) with bf16 scales and zeros (what the kernels
read), so an int4 file holds ~0.56 bytes a weight. The token embedding (a third of a small model's bytes) is
stored as int8 per row and widened on load, as llama.cpp quantizes its token table; the other float parts
(norms, encoders) keep the source checkpoint's dtype. A head tied to the embedding is not stored: loading
quantizes it from the embedding again (int8 per channel is deterministic, so the codes are the same).

Loading builds the model on the meta device, puts a `QuantLinear` where the file holds codes, and fills
the remaining (float) parameters from the file: the float weights of quantized layers never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.trunk import Ernie45PreTrainedModel
from ..runtime.quant import QuantLinear, install_experts, quantize_int8
from .files import CheckpointError

KEY = "ernie45_quantization"
ROUTER = ("gate.weight", "e_score_correction_bias")  # fp32 always
EMBED = "model.embed_tokens.weight"


def save_quantized(model: nn.Module, out: str | Path, float_dtype: torch.dtype | None = None) -> Path:
    """Write a model quantized by `ernie45.runtime.quant.quantize` (config.json + model.safetensors); float
    parameters in `float_dtype` (default: as they are)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    tied_head = model.config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), QuantLinear)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized.add(name)
            if tied_head and name == "lm_head":
                continue  # made again from the embedding on load
            codes, scales = module.portable()
            if module.bits == 4:
                codes = _pack(codes)
                scales = scales.to(torch.bfloat16)
            tensors[f"{name}.codes"] = codes.contiguous().cpu()
            tensors[f"{name}.scales"] = scales.contiguous().cpu()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.data.contiguous().cpu()
    for name, p in model.named_parameters():
        if name == EMBED:
            tensors[f"{EMBED}.codes"], tensors[f"{EMBED}.scales"] = (
                t.contiguous().cpu() for t in quantize_int8(p.data)
            )
        elif name.rpartition(".")[0] not in quantized:
            t = p.data
            if float_dtype is not None and t.is_floating_point() and not name.endswith(ROUTER):
                t = t.to(float_dtype)
            tensors[name] = t.contiguous().cpu()
    spec = dict(getattr(model.config, KEY))
    spec.update(int4_codes="packed", tied_head_from_embedding=bool(tied_head), embedding="int8")
    setattr(model.config, KEY, spec)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if float_dtype is not None:
        model.config.dtype = float_dtype
    model.config.save_pretrained(out)
    return out


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes 0..15 [N, K] -> uint8 [N, K/2], column 2j in the low nibble, 2j + 1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, ::2] | (c[:, 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def load_quantized(path: Path, model: nn.Module, dtype: torch.dtype | None, device) -> nn.Module:
    """Fill `model` (built on meta from a quantized checkpoint's config) from `path`."""
    spec = getattr(model.config, KEY)
    bits, group = spec["bits"], spec["group_size"]
    packed = spec.get("int4_codes") == "packed"
    sd = load_file(path / "model.safetensors", device=str(device or "cpu"))
    float_dtype = dtype or next((t.dtype for k, t in sd.items() if t.dtype.is_floating_point
                                 and not k.endswith((*ROUTER, ".scales"))), torch.float32)  # fmt: skip

    if f"{EMBED}.codes" in sd:  # int8 per row, widened to the float dtype
        codes, scales = sd.pop(f"{EMBED}.codes"), sd.pop(f"{EMBED}.scales")
        sd[EMBED] = (codes.float() * scales.float()[:, None]).to(float_dtype)

    def quant(name: str, shape: tuple[int, ...]) -> QuantLinear:
        """The linear `name` of weight shape (out, in), its codes and scales checked against that shape (a file that
        does not match would load, then fail every request)."""
        if f"{name}.codes" not in sd or f"{name}.scales" not in sd:
            raise CheckpointError(f"quantized checkpoint {path} lacks {name}.codes or {name}.scales")
        codes, scales = sd.pop(f"{name}.codes"), sd.pop(f"{name}.scales")
        width = 8 if codes.dtype == torch.int8 else bits  # int8 codes are signed, int4 ones 0..15 (the head: int8)
        n, k = shape
        want = ((n, k // 2) if packed else (n, k), (k // group, n, 2)) if width == 4 else ((n, k), (n,))
        if (tuple(codes.shape), tuple(scales.shape)) != want or (width == 4 and k % group):
            raise CheckpointError(
                f"quantized checkpoint {path}: {name} has codes {tuple(codes.shape)} and scales "
                f"{tuple(scales.shape)}; a {n}x{k} int{width} linear needs {want[0]} and {want[1]}"
            )
        if width == 4 and packed:
            codes = _unpack(codes)
        return QuantLinear(codes, scales.float(), sd.pop(f"{name}.bias", None), bits=width, group=group,
                           dtype=float_dtype)  # fmt: skip

    for name in sorted({k[: -len(".codes")] for k in sd if k.endswith(".codes")}):
        parent_name, _, leaf = name.rpartition(".")
        if parent_name.endswith((".q_gate_up", ".q_down")):
            continue  # expert stacks: built per group below
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized checkpoint {path} holds {name}, which the model does not have") from None
        model.get_submodule(parent_name)._modules[leaf] = quant(name, tuple(linear.weight.shape))
    for name, module in list(model.named_modules()):
        if f"{name}.q_gate_up.0.codes" in sd:
            experts = range(module.num_experts)
            up, down = tuple(module.gate_up_proj.shape[1:]), tuple(module.down_proj.shape[1:])
            install_experts(model, name, [quant(f"{name}.q_gate_up.{e}", up) for e in experts],
                            [quant(f"{name}.q_down.{e}", down) for e in experts])  # fmt: skip
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
    if spec.get("tied_head_from_embedding"):
        model.lm_head = QuantLinear.from_float(model.model.embed_tokens.weight.data, None, 8, group)
    elif model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = float_dtype
    return model


def _from_pretrained(path, dtype: torch.dtype | None, device):
    from .load import load

    return load(path, dtype=dtype, device=device)


Ernie45PreTrainedModel.quantized_loader = staticmethod(_from_pretrained)
