"""Log-probabilities in the OpenAI wire formats: chat's `logprobs.content` and completions' `logprobs` object
(tokens, token_logprobs, top_logprobs, text_offset), which lm-evaluation-harness reads for scoring."""

from __future__ import annotations

from typing import Any

from ..engine.sampling import Logprob


def _tops(entry: dict[int, Logprob], top: int) -> list[Logprob]:
    return sorted((v for v in entry.values() if v.rank <= top), key=lambda v: v.rank)


def chat_logprobs(entries: list[dict[int, Logprob]], ids: list[int], top: int) -> dict[str, Any]:
    """{"content": [...]} for these answer tokens (one entry per id)."""

    def one(lp: Logprob) -> dict[str, Any]:
        return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode())}

    return {"content": [{**one(e[t]), "top_logprobs": [one(v) for v in _tops(e, top)]}
                        for e, t in zip(entries, ids, strict=True)]}  # fmt: skip


def completion_logprobs(entries: list[dict[int, Logprob] | None], ids: list[int], top: int, decode,
                        offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """The completions `logprobs` object for tokens `ids` (an entry None: the prompt's first token, which nothing
    predicts); text offsets count from `offset`."""
    tokens, values, tops, offsets = [], [], [], []
    for e, t in zip(entries, ids, strict=True):
        text = decode(t) if e is None else e[t].decoded_token
        tokens.append(text)
        values.append(None if e is None else e[t].logprob)
        tops.append(None if e is None else {v.decoded_token: v.logprob for v in _tops(e, top)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
