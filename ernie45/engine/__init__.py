"""The engine: batched generation with a static KV cache, sampling, streaming."""

from .cache import StaticKVCache
from .llm import LLM, Completion, Delta
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "Delta", "SamplingParams", "StaticKVCache"]
