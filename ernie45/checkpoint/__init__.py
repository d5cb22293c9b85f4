"""Checkpoints: reading any supported layout into the trunk, and writing the official layout back."""

from . import quantized  # noqa: F401,I001  (lets from_pretrained load `ernie45 quantize` output)
from .export import export, official_tensors
from .files import CheckpointError
from .load import build_on_meta, load

__all__ = ["CheckpointError", "build_on_meta", "export", "load", "official_tensors"]
