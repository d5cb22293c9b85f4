"""Training: data and packing, the MoE losses, DPO and LoRA, on transformers' Trainer."""

from .data import DataError, Sample, load_samples
from .packing import collate_packed, collate_padded, pack
from .recipe import build_trainer, run
from .trainer import DPOSettings, Ernie45Trainer, LossWeights

__all__ = [
    "DPOSettings",
    "DataError",
    "Ernie45Trainer",
    "LossWeights",
    "Sample",
    "build_trainer",
    "collate_packed",
    "collate_padded",
    "load_samples",
    "pack",
    "run",
]
