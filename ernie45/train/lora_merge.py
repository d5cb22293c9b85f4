"""`ernie45 merge BASE ADAPTERS OUT`: LoRA adapters folded into the float base model.

Adapters trained on a quantized base (`model.quantize` in a recipe) sit beside int8 / int4 matrices, including
each routed expert's (`…groups.text.q_gate_up.3`); PEFT cannot apply those names to the float base, whose
experts are stacked tensors. Here each adapter's product `scale · B A` is added to the float weight it adapted —
a linear's `weight`, or expert e's slice of its group's `gate_up_proj` / `down_proj` — so the result is the base
plus exactly the trained deltas (it never saw the quantization error the training saw), written in bf16.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import load
from ..checkpoint.load import cast

EXPERT = re.compile(r"(?P<group>.+)\.q_(?P<which>gate_up|down)\.(?P<e>\d+)")


def merge_adapters(base: str | Path, adapters: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The float base at `base` with the LoRA adapters at `adapters` (PEFT's layout) added; router in fp32."""
    adapters = Path(adapters)
    config_file, weights_file = adapters / "adapter_config.json", adapters / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{adapters}: no LoRA adapters here (adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("target_parameters"):  # stacked-expert adapters on a float base: PEFT applies its own kind
        from peft import PeftModel

        return PeftModel.from_pretrained(load(base, dtype=torch.float32), adapters).merge_and_unload().to(dtype)
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    weights = load_file(weights_file)
    model = load(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    for key in sorted(k for k in weights if ".lora_A." in k):
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"{adapters}: {key} has no lora_B partner")
        delta = scale * (b.float() @ weights[key].float())
        found = EXPERT.fullmatch(module)
        if found:
            target = params.get(f"{found['group']}.{found['which']}_proj")
            e = int(found["e"])
            if target is None or e >= target.shape[0] or target[e].shape != delta.shape:
                raise ValueError(f"{key}: the base has no expert {e} of shape {list(delta.shape)} at {module}")
            target.data[e] += delta
            continue
        target = params.get(f"{module}.weight")
        if target is None or target.shape != delta.shape:
            raise ValueError(f"{key}: the base has no weight of shape {list(delta.shape)} at {module}")
        target.data += delta
    return cast(model, dtype)
