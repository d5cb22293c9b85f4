"""Weight-only quantized checkpoints (`ernie45 quantize`): the ernie45 layout, with each quantized matrix
stored as device-independent codes plus scales, and `config.json` saying how (`ernie45_quantization`).

Loading builds the model on the meta device, puts a `QuantLinear` where the file holds codes, and fills
the remaining (float) parameters from the file: the float weights of quantized layers never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.quant import QuantLinear, install_experts
from .files import CheckpointError

KEY = "ernie45_quantization"


def save_quantized(model: nn.Module, out: str | Path) -> Path:
    """Write a model quantized by `ernie45.model.quant.quantize` (config.json + model.safetensors)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            codes, scales = module.portable()
            tensors[f"{name}.codes"] = codes.contiguous().cpu()
            tensors[f"{name}.scales"] = scales.contiguous().cpu()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.data.contiguous().cpu()
            quantized.add(name)
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in quantized:
            tensors[name] = p.data.contiguous().cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    return out


def load_quantized(path: Path, model: nn.Module, dtype: torch.dtype | None, device) -> nn.Module:
    """Fill `model` (built on meta from a quantized checkpoint's config) from `path`."""
    spec = getattr(model.config, KEY)
    bits, group = spec["bits"], spec["group_size"]
    sd = load_file(path / "model.safetensors", device=str(device or "cpu"))
    float_dtype = dtype or next((t.dtype for k, t in sd.items() if t.dtype.is_floating_point), torch.float32)

    def quant(name: str) -> QuantLinear:
        codes = sd.pop(f"{name}.codes")
        width = 8 if codes.dtype == torch.int8 else bits  # int8 codes are signed, int4 ones 0..15 (the head: int8)
        return QuantLinear(codes, sd.pop(f"{name}.scales"), sd.pop(f"{name}.bias", None), width, group, float_dtype)

    for name in sorted({k[: -len(".codes")] for k in sd if k.endswith(".codes")}):
        parent_name, _, leaf = name.rpartition(".")
        if parent_name.endswith((".q_gate_up", ".q_down")):
            continue  # expert stacks: built per group below
        model.get_submodule(parent_name)._modules[leaf] = quant(name)
    for name, module in list(model.named_modules()):
        if f"{name}.q_gate_up.0.codes" in sd:
            experts = range(module.num_experts)
            install_experts(module, [quant(f"{name}.q_gate_up.{e}") for e in experts],
                            [quant(f"{name}.q_down.{e}") for e in experts])  # fmt: skip
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
        if t.dtype.is_floating_point and not name.endswith(("gate.weight", "e_score_correction_bias")):
            t = t.to(float_dtype)
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    if missing or sd:
        raise CheckpointError(f"quantized checkpoint {path} does not fit its config: missing {missing[:5]}, "
                              f"unexpected {list(sd)[:5]}")  # fmt: skip
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = float_dtype
    return model
