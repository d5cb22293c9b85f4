"""ernie45: a PyTorch-native stack for the ERNIE 4.5 family (dense, MoE, VL, omni)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from . import demo  # noqa: F401  (registers the demo's recipe entries with train)
from .checkpoint import CheckpointError, export, load
from .config import MODALITIES, ConfigError, Ernie45Config
from .engine import LLM, Completion, SamplingParams
from .model import Ernie45ForConditionalGeneration, Ernie45Model
from .official_config import read_config
from .processing.hf_processor import Ernie45Processor
from .processing.processor import Processor, load_processor
from .processing.tokenizer import Ernie45Tokenizer

AutoConfig.register("ernie45", Ernie45Config, exist_ok=True)
AutoModel.register(Ernie45Config, Ernie45Model, exist_ok=True)
AutoModelForCausalLM.register(Ernie45Config, Ernie45ForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(Ernie45Config, Ernie45ForConditionalGeneration, exist_ok=True)
AutoProcessor.register(Ernie45Config, Ernie45Processor, exist_ok=True)
AutoTokenizer.register(Ernie45Config, tokenizer_class=Ernie45Tokenizer, exist_ok=True)

__all__ = [
    "MODALITIES",
    "LLM",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "Ernie45Config",
    "Ernie45ForConditionalGeneration",
    "Ernie45Processor",
    "Ernie45Model",
    "export",
    "load",
    "load_processor",
    "Processor",
    "read_config",
    "SamplingParams",
]
__version__ = "0.1.0"
