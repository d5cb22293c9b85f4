"""vLLM's `LLM(...)` keyword options: the ones that mean something on this engine are applied, the rest are
refused by name (an option that is accepted and does nothing is worse than an error)."""

from __future__ import annotations

from typing import Any

from .speculative import SpeculativeConfig

# option -> what it does here
VLLM_OPTIONS = {
    "enforce_eager": "True: no torch.compile (as compile=False)",
    "seed": "the default sampling seed",
    "max_model_len": "the longest prompt + answer, in tokens (at most the model's context)",
    "tensor_parallel_size": "1 only (one process, one device)",
    "trust_remote_code": "accepted: ernie45 runs no remote code, every checkpoint it reads is built in",
    "tokenizer": "the checkpoint's own directory only (a tokenizer elsewhere is not supported)",
    "speculative_config": '{"method": "ngram", "num_speculative_tokens": 4, ...}: prompt-lookup speculative decoding',
}


def apply_vllm_options(options: dict[str, Any], compile: bool | None) -> tuple[bool | None, dict[str, Any]]:
    """(compile, the options that the engine reads later: seed, max_model_len); raises TypeError otherwise."""
    unknown = sorted(set(options) - set(VLLM_OPTIONS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in VLLM_OPTIONS.items())
        raise TypeError(f"LLM() got option(s) {', '.join(unknown)} that ernie45 does not have. vLLM options it "
                        f"takes: {known}")  # fmt: skip
    if options.get("tensor_parallel_size", 1) != 1:
        raise ValueError("tensor_parallel_size: ernie45.LLM runs on one device; use 1")
    if options.get("tokenizer") is not None:
        raise ValueError("tokenizer=: ernie45 reads the tokenizer from the checkpoint directory; leave it out")
    if options.get("enforce_eager"):
        if compile:
            raise ValueError("enforce_eager=True and compile=True contradict each other")
        compile = False
    max_len = options.get("max_model_len")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
        raise ValueError(f"max_model_len must be an integer >= 2, got {max_len!r}")
    out = {k: options[k] for k in ("seed", "max_model_len") if k in options}
    out["speculative"] = SpeculativeConfig.parse(options.get("speculative_config"))
    return compile, out
