"""Placeholder expansion: each media item's single placeholder becomes one token per feature it yields."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<|IMAGE_PLACEHOLDER|>"
VIDEO_PLACEHOLDER = "<|VIDEO_PLACEHOLDER|>"
AUDIO_PLACEHOLDER = "<|AUDIO_PLACEHOLDER|>"


def expand_text(text: str, placeholder: str, counts: list[int]) -> str:
    """Replace the i-th `placeholder` in text by counts[i] copies of it."""
    parts = text.split(placeholder)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the prompt has {len(parts) - 1} {placeholder} but {len(counts)} media items were given")
    out = [parts[0]]
    for n, rest in zip(counts, parts[1:], strict=True):
        out.append(placeholder * n + rest)
    return "".join(out)


def expand_ids(ids: list[int], token_id: int, counts: list[int]) -> list[int]:
    """Replace the i-th occurrence of `token_id` in ids by counts[i] copies of it."""
    found = ids.count(token_id)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} placeholder tokens {token_id} but {len(counts)} media items")
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        out.extend([t] * next(it) if t == token_id else [t])
    return out
