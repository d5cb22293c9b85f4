"""Constrained decoding: a request's answer follows a JSON schema, a regex, a choice of strings or a grammar.

The grammar engine is llguidance (Rust; no torch dependency): chosen over xgrammar, which pins torch versions this
project cannot follow, and outlines-core, whose index is built per vocabulary and schema ahead of decoding (seconds
for a large vocabulary) where llguidance computes each step's token mask lazily in ~50-100 us. Each request has
its own matcher; the scheduler masks that request's logits before sampling and feeds it the sampled token, so
constrained and free requests share a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..processing.tools import JSON_STYLE


@dataclass
class StructuredOutputs:
    """What the answer must match (vLLM's `StructuredOutputsParams`): exactly one of the fields."""

    json: dict[str, Any] | str | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")  # fmt: skip
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")

    def grammar_text(self) -> str:
        from llguidance import LLMatcher

        compact = JSON_STYLE  # ", " and ": " only: a model cannot spend its tokens on whitespace
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return LLMatcher.grammar_from_json_schema(schema, overrides=compact)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in self.choice)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(self.grammar)


class Constraint:
    """One request's matcher: `mask` the logits of the next token, `advance` by the sampled one."""

    def __init__(self, spec: StructuredOutputs, tokenizer) -> None:
        from llguidance import LLMatcher

        try:
            grammar = spec.grammar_text()
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured outputs: {e}") from None
        self.matcher = LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"structured outputs: {self.matcher.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] with every token the grammar does not allow next at -inf."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        n = allowed.numel()
        out = logits.clone()
        out[0, :n] = out[0, :n].masked_fill(allowed.to(out.device) == 0, float("-inf"))
        if out.shape[-1] > n:  # model rows past the tokenizer's vocabulary
            out[0, n:] = float("-inf")
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar has ended (only the end of the answer may follow)."""
        return self.matcher.is_stopped()


_tokenizers: dict[int, Any] = {}


def _ll_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer."""
    key = id(tokenizer)
    if key not in _tokenizers:
        import llguidance.hf

        _tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
    return _tokenizers[key][1]
