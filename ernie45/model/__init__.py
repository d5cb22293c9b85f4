"""The model trunk: one set of modules for every ERNIE 4.5 variant."""

from .trunk import Ernie45ForConditionalGeneration, Ernie45Model, Ernie45PreTrainedModel

__all__ = ["Ernie45ForConditionalGeneration", "Ernie45Model", "Ernie45PreTrainedModel"]
