"""Sampling parameters (vLLM's names) and the logits pipeline: penalties, temperature, top-k/p, min-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .structured import StructuredOutputs


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # answers per prompt (vLLM's `n`): `LLM.generate` / `chat` return them in `.outputs`
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the answer before this many tokens
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids before sampling
    logprobs: int | None = None  # per answer token: its log-probability and the `logprobs` most likely (0: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring)
    structured_outputs: StructuredOutputs | None = None  # the answer follows a JSON schema, regex, choice, grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0 (0: score the prompt only, with prompt_logprobs)"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
            (1 <= self.n <= 64, "n (answers per prompt) must be in [1, 64]"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether `apply_penalties` changes anything (else the seen / counts bookkeeping can be skipped)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Logprob:
    """One token's log-probability under the model (raw logits, before penalties and sampling filters), its rank
    among all tokens (1: the most likely) and its text (vLLM's `Logprob`)."""

    logprob: float
    rank: int
    decoded_token: str


def position_logprobs(logits: torch.Tensor, chosen: int, top: int, decode) -> dict[int, Logprob]:
    """{token id: Logprob} at one position from its logits [V]: the chosen token and the `top` most likely."""
    lp = torch.log_softmax(logits.float(), -1)
    value = float(lp[chosen])
    out = {chosen: Logprob(value, int((lp > lp[chosen]).sum()) + 1, decode(chosen))}
    if top:
        values, ids = lp.topk(top)
        for rank, (t, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), start=1):
            if t not in out:
                out[t] = Logprob(v, rank, decode(t))
    return out


MIN_TEMPERATURE = 1e-4  # below this, logits / temperature overflows: sampling is greedy


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool (prompt + output tokens); counts [B, V] output-token counts."""
    if p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.presence_penalty:
        logits = logits - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks on fp32 logits [B, V]."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from fp32 logits [B, V] (after penalties); greedy takes logits of any float dtype."""
    if p.greedy:
        return logits.argmax(-1)
    logits = logits.nan_to_num(nan=float("-inf"))
    probs = filter_logits(logits, p).softmax(-1)
    bad = ~torch.isfinite(probs).all(-1)  # overflowing penalties or logits: fall back to the best token
    if bad.any():
        best = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
        probs = torch.where(bad[:, None], best, probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
