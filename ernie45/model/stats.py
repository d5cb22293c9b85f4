"""Parameter counts (total and active per token), computed on any device including meta."""

from __future__ import annotations

from torch import nn

from ..config import MODALITIES
from .moe import MoEBlock

# Encoder submodules of the trunk and the modalities whose tokens they produce.
ENCODERS = {
    "vision_tower": ("image", "video"),
    "resampler_model": ("image", "video"),
    "audio_tower": ("audio",),
    "audio_resampler": ("audio",),
}


def parameter_counts(model: nn.Module, modality: str = "text") -> tuple[int, int]:
    """(total, active for one token of `modality`).

    A token runs top-k of its own group's experts only, and no encoder of another modality.
    """
    total = sum(p.numel() for p in model.parameters())
    active = total
    mid = MODALITIES[modality]
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in ENCODERS and modality not in ENCODERS[name.rpartition(".")[2]]:
            active -= sum(p.numel() for p in module.parameters())
    for block in model.modules():
        if not isinstance(block, MoEBlock):
            continue
        for name, group in block.groups.items():
            experts = group.gate_up_proj.numel() + group.down_proj.numel()
            if mid in block.group_modalities[name]:
                active -= experts * (group.num_experts - group.gate.top_k) // group.num_experts
            else:
                active -= experts + group.gate.weight.numel()
    return total, active
