"""Speculative decoding in the scheduler: prompt-lookup (n-gram) or MTP drafts, verified in one forward.

A decode step reads every weight to make one token, so on a CPU or a small batch it is bound by memory, not
arithmetic: a forward over the last token plus k drafted ones costs about one step. The draft is the
continuation of the latest earlier place where the answer's last n tokens occurred (in the prompt or the
answer so far) — free, and good wherever the answer copies (summaries, extraction, code edits, documents).
With `method="mtp"` the draft is the model's own multi-token-prediction block's guess (`model.mtp`): by default
one token per step, from the trunk's hidden state of the verify forward and the token just chosen; with
`num_speculative_tokens` k, k tokens, the block run again on its own output for each one past the first. The
MTP block attends over its own cache, which starts with the last `MTP_WINDOW` positions before the request's
first speculative step (kept by the prefill, or recomputed once by that step's forward).

Acceptance keeps the output exactly what plain decoding gives: greedy rows take drafted tokens while they are
the argmax; sampled rows take a drafted token d with probability p(d) and otherwise sample from p without d
(speculative sampling with a one-token proposal), so every token still comes from the target distribution.
Rows with penalties, logit bias, grammars, logprobs, min_tokens or media in the prompt decode as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..model.layers import attention_mask
from ..model.mtp import mtp_forward
from .cache import GrowingKVCache
from .requests import has_media
from .sampling import filter_logits

if TYPE_CHECKING:
    from .batcher import BatchEngine
    from .requests import Request


MTP_WINDOW = 128  # positions the MTP block's cache starts with (before them, its attention does not reach)
MTP_MAX_DRAFTS = 7  # a verify of the last token and 7 drafts is 8 rows: one fused decode call a layer
METHODS = {"ngram": "ngram", "mtp": "mtp", "ernie_mtp": "mtp"}  # vLLM calls ERNIE's "ernie_mtp"


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}`, or `{"method": "mtp"}` (one drafted token per step by default; with
    `num_speculative_tokens` k up to `MTP_MAX_DRAFTS`, the one MTP block runs k times, each on its own output)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    @classmethod
    def parse(cls, spec: Any) -> SpeculativeConfig | None:
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if not isinstance(spec, dict):
            raise ValueError('speculative_config: a dict like {"method": "ngram", "num_speculative_tokens": 4}')
        unknown = sorted(set(spec) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"})
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}")
        method = METHODS.get(spec.get("method", "ngram"))
        if method is None:
            raise ValueError(f"speculative_config: method {spec.get('method')!r}; choose from {', '.join(METHODS)}")
        if method == "mtp" and not 1 <= spec.get("num_speculative_tokens", 1) <= MTP_MAX_DRAFTS:
            raise ValueError(f"speculative_config: MTP drafts 1-{MTP_MAX_DRAFTS} tokens a step (num_speculative_tokens;"
                             " past the first, the block runs again on its own output)")  # fmt: skip
        lookup = sorted(k for k in spec if k.startswith("prompt_lookup"))
        if method == "mtp" and lookup:
            raise ValueError(f"speculative_config: {', '.join(lookup)} set the n-gram method; MTP does not read them")
        mtp_k = {"num_speculative_tokens": spec.get("num_speculative_tokens", 1)} if method == "mtp" else {}
        config = cls(**{**spec, "method": method, **mtp_k})
        if not 1 <= config.num_speculative_tokens <= 16:
            raise ValueError("speculative_config: num_speculative_tokens is 1-16")
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError("speculative_config: 1 <= prompt_lookup_min <= prompt_lookup_max")
        return config


def ngram_draft(ids: list[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    arr = np.asarray(ids, dtype=np.int64)
    total = len(arr)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        tail = arr[total - n :]
        starts = np.flatnonzero(arr[: total - n] == tail[0])  # candidates, latest last
        for s in starts[::-1]:
            if s + n < total and np.array_equal(arr[s : s + n], tail):
                return arr[s + n : s + n + k].tolist()
    return []


def why_not(req: Request) -> str | None:
    """Why `req` decodes without drafts (None: it may draft). These rows' next token depends on more than the
    logits this path verifies (penalties, a bias, a grammar's mask, logprobs, a minimum length, 3D positions)."""
    p = req.params
    short = p.min_tokens and len(req.row.token_ids) < p.min_tokens
    reasons = (
        ("penalties", p.penalised),
        ("logit_bias", p.logit_bias),
        ("a grammar", req.constraint is not None),
        ("logprobs", p.logprobs is not None),
        ("min_tokens", short),
        ("media in the prompt", has_media(req.encoded)),  # 3D RoPE positions after a picture: not verified
    )
    return next((why for why, applies in reasons if applies), None)


def accept(logits: torch.Tensor, draft: list[int], req: Request) -> list[int]:
    """The tokens this step yields: the drafted ones accepted, then one from the target (a correction or, all
    accepted, the next). logits [k+1, V]: row i is the distribution after the last token and i drafts."""
    p = req.params
    if p.greedy:
        best = logits.argmax(-1).tolist()
        out = []
        for i, d in enumerate(draft):
            if best[i] != d:
                return [*out, best[i]]
            out.append(d)
        return [*out, best[len(draft)]]
    probs = filter_logits(logits.float().nan_to_num(nan=float("-inf")), p).softmax(-1)
    out = []
    for i, d in enumerate(draft):
        u = torch.rand((), generator=req.generator, device=probs.device)
        if u < probs[i, d]:
            out.append(d)
            continue
        rest = probs[i].clone()
        rest[d] = 0  # the draft's share goes: what is left is p's distribution given "not d"
        if rest.sum() <= 0:
            return [*out, d]
        return [*out, int(torch.multinomial(rest / rest.sum(), 1, generator=req.generator))]
    return [*out, int(torch.multinomial(probs[len(draft)], 1, generator=req.generator))]


def speculate(engine: BatchEngine, req: Request, config: SpeculativeConfig) -> bool:
    """One verified step for `req` if a draft is found (its tokens pushed like sampled ones); False: no draft."""
    slot, cache = req.slot, engine.cache
    start = cache.lengths[slot]
    room = min(config.num_speculative_tokens, engine.max_len - start - 2,
               req.params.max_tokens - len(req.row.token_ids) - 1)  # fmt: skip
    if room < 1:
        return False
    backoff = req.speculation
    if backoff[0]:  # a verify forward costs more than a decode step: after misses, draft less often
        backoff[0] -= 1
        return False
    if config.method == "mtp":
        return _mtp_step(engine, req, start, min(config.num_speculative_tokens, room))
    history = [*req.encoded["input_ids"], *req.row.token_ids]
    draft = ngram_draft(history, room, config.prompt_lookup_min, config.prompt_lookup_max)
    if not draft:
        return False
    dev = engine.model.device
    ids = torch.tensor([[req.last_token, *draft]], device=dev)
    mask = torch.ones(1, start + ids.shape[1], dtype=torch.long, device=dev)
    logits = engine.model(input_ids=ids, cache=cache.slot(slot), attention_mask=mask, logits_to_keep=0).logits[0]
    tokens = accept(logits, draft, req)
    kept = len(tokens) - 1  # drafted tokens whose keys and values stay in the cache
    backoff[1] = 0 if kept else backoff[1] + 1
    backoff[0] = 0 if kept else min(2 ** backoff[1], 64)
    _commit(engine, req, start, draft, tokens)
    return True


def _commit(engine: BatchEngine, req: Request, start: int, draft: list[int], tokens: list[int]) -> None:
    """The cache keeps the last token and the accepted drafts; the step's tokens are pushed like sampled ones."""
    kept = len(tokens) - 1
    engine.cache.lengths[req.slot] = start + 1 + kept
    if engine.slot_tokens[req.slot] is not None:
        engine.slot_tokens[req.slot].extend([req.last_token, *draft[:kept]])
    engine.stats["draft_tokens"] += len(draft)
    engine.stats["accepted_tokens"] += kept
    for tok in tokens:
        engine._push(req, tok, None)
        if req.row.finish_reason is not None:
            break


def _mtp_step(engine: BatchEngine, req: Request, start: int, k: int = 1) -> bool:
    """Verify the MTP draft made last step, then run the MTP block over the newly confirmed positions and keep
    its k guesses for the next step. `req.mtp` holds (the MTP block's cache, the draft, the first position the MTP
    cache lacks). Positions it lacks before this step's are recomputed by this step's forward, for their hidden
    states: on the first step the last `MTP_WINDOW` cached positions (unless the prefill kept them:
    `req.mtp_seed`), after plain steps those steps' tokens.
    After two wrong drafts in a row the request decodes plainly for 2, 4, ... 64 steps."""
    model, slot, cache = engine.model, req.slot, engine.cache
    trunk = model.model
    seed = req.mtp_seed if req.mtp is None else None  # the prefill's hidden states, up to position `start`
    req.mtp_seed = None
    if req.mtp is None:
        c = model.config
        dtype = trunk.embed_tokens.weight.dtype
        mtp_cache = GrowingKVCache(c.num_key_value_heads, c.head_dim, dtype, model.device, MTP_WINDOW * 2)
        req.mtp = (mtp_cache, [], start - min(MTP_WINDOW, start))
    mtp_cache, draft, base = req.mtp
    draft = draft[:k]  # guessed when there was more room (the cache's end, max_tokens)
    prompt = req.encoded["input_ids"]  # positions base..start of prompt + answer, without joining the two whole
    history = [*prompt[base:start], *req.row.token_ids[max(base - len(prompt), 0) : max(start - len(prompt), 0)]]
    full = [*history, req.last_token, *draft]
    # positions the prefill's kept hidden states cover are not recomputed
    skip = len(history) if seed is not None and seed[1] == start and seed[0].shape[1] >= len(history) else 0
    ids = torch.tensor([full[skip:]], device=model.device)
    cache.lengths[slot] = base + skip  # recomputed positions get the same keys and values again
    mask = torch.ones(1, base + len(full), dtype=torch.long, device=model.device)
    out = trunk(input_ids=ids, cache=cache.slot(slot), attention_mask=mask, keep_trunk_hidden=True)
    logits = model.lm_head(out.last_hidden_state[0, len(history) - skip :])
    tokens = accept(logits, draft, req)
    kept = len(tokens) - 1
    _commit(engine, req, start, draft, tokens)
    if req.row.finish_reason is not None:
        return True
    if draft:  # two misses in a row: skip 2, 4, ... up to 64 steps; the MTP cache waits from `base` on
        backoff = req.speculation
        backoff[1] = 0 if kept else backoff[1] + 1
        if backoff[1] >= 2:
            backoff[0], req.mtp = min(2 ** (backoff[1] - 1), 64), (mtp_cache, [], base)
            return True
    # the MTP slots now confirmed: position q's hidden state with the token at q + 1
    hidden = out.hidden_states[0][:, : len(history) - skip + kept + 1]
    if skip:
        hidden = torch.cat([seed[0][:, seed[0].shape[1] - skip :].to(hidden.dtype), hidden], dim=1)
    following = torch.tensor([[*full[1 : len(history) + kept + 1], tokens[-1]]], device=model.device)
    past = mtp_cache.get_seq_length()
    n = following.shape[1]
    pos = torch.arange(base + 1, base + 1 + n, device=model.device)[None]
    mask = attention_mask(None, n, past + n, model.device)
    h = mtp_forward(trunk, hidden, trunk.embed_tokens(following), pos, mask, mtp_cache)
    req.mtp = (mtp_cache, _mtp_guesses(model, h[:, -1:], pos[0, -1] + 1, mtp_cache, k), start + 1 + kept)
    return True


def _mtp_guesses(model, h: torch.Tensor, position, mtp_cache: GrowingKVCache, k: int) -> list[int]:
    """k greedy guesses from the MTP block's last output h [1, 1, H]: the first from h, each further one from the
    block run again on its own previous output and guess, one position on (as DeepSeek-V3 chains its MTP modules,
    here one module reused, as vLLM does). The cache entries those extra runs add are dropped again: the block's
    cache holds confirmed positions only."""
    trunk, confirmed = model.model, mtp_cache.length
    guesses = [int(model.lm_head(trunk.norm(h[:, -1])).argmax(-1))]
    for i in range(1, k):
        pos = torch.tensor([[int(position) + i - 1]], device=h.device)
        mask = attention_mask(None, 1, mtp_cache.length + 1, h.device)
        h = mtp_forward(trunk, h, trunk.embed_tokens(torch.tensor([guesses[-1:]], device=h.device)), pos, mask,
                        mtp_cache)  # fmt: skip
        guesses.append(int(model.lm_head(trunk.norm(h[:, -1])).argmax(-1)))
    mtp_cache.length = confirmed
    return guesses
