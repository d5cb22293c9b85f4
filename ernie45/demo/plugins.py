"""The demo's entries in a recipe: `data: {demo: {...}}`, `model: {tokenizer: demo}`, `model: {split_numbers: true}`."""

from __future__ import annotations

from pathlib import Path

from ..train.plugins import DataSource, register_source, register_tokenizer, register_tokenizer_option

KEYS = ("rows", "seed", "mix", "turns", "describe_last", "image_side", "video_side", "encoder_pretrain",
        "copy_pretrain")  # fmt: skip


def _rows(proc, spec: dict, max_tokens: int, rows: int, seed: int):
    from .data import DemoRows

    return DemoRows(proc, spec.get("rows", rows), max_tokens, spec.get("seed", seed), spec.get("mix"),
                    spec.get("turns", 1), spec.get("describe_last", False))  # fmt: skip


def _prepare(model, proc, spec: dict, seed: int) -> None:
    from .data import configure

    unknown = sorted(set(spec) - set(KEYS))
    if unknown:  # a typo here would silently train on the defaults
        raise ValueError(f"recipe: unknown data.demo keys {unknown}; known: {', '.join(KEYS)}")
    configure(proc, spec.get("image_side", 140), spec.get("video_side", 84))
    stage0 = spec.get("encoder_pretrain")
    if stage0:  # the media encoders learn from the pictures' and clips' facts before the trunk reads them
        from .encoders import pretrain_encoders

        phases = [stage0] if isinstance(stage0, dict) else stage0
        if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
            raise ValueError("recipe: data.demo.encoder_pretrain is a mapping (one phase) or a list of them (phases "
                             f"run in order), not {stage0!r}")  # fmt: skip
        for phase in phases:
            _check_keys("encoder_pretrain", phase, pretrain_encoders)
        # each phase draws its own data (the first keeps the recipe's seed) and trains its own new probe heads:
        # only what the encoders learned carries from one phase to the next
        for i, phase in enumerate(phases):
            pretrain_encoders(model, proc, seed=seed + 1_000 * i, **phase)
    copying = spec.get("copy_pretrain")
    if copying:  # the trunk learns to copy from its context before the answers that need it
        from .induction import pretrain_copying

        if not isinstance(copying, dict):
            raise ValueError(f"recipe: data.demo.copy_pretrain is a mapping (steps, batch, ...), not {copying!r}")
        _check_keys("copy_pretrain", copying, pretrain_copying)
        pretrain_copying(model, proc.tokenizer, seed=seed, **copying)


def _check_keys(entry: str, phase: dict, fn) -> None:
    """A phase's keys are `fn`'s own parameters (a typo would silently train on a default), its required ones
    included (a missing one would end in a TypeError's traceback)."""
    import inspect

    given_by_caller = ("model", "proc", "tokenizer", "seed")
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in given_by_caller}
    if wrong := sorted(set(phase) - set(params)):
        raise ValueError(f"recipe: data.demo.{entry}: {wrong!r} is not a key; known: {', '.join(params)}")
    if missing := [k for k, p in params.items() if p.default is p.empty and k not in phase]:
        raise ValueError(f"recipe: data.demo.{entry}: give {', '.join(missing)} (no default)")


def _build_tokenizer(out: Path) -> Path:
    from .tokenizer import build_tokenizer

    return build_tokenizer(out)


def _split_numbers(tokenizer) -> int:
    from .tokenizer import split_numbers

    return split_numbers(tokenizer)


register_source("demo", DataSource(rows=_rows, prepare=_prepare))
register_tokenizer("demo", _build_tokenizer)  # byte-level BPE trained on the demo's own text
register_tokenizer_option("split_numbers", _split_numbers)  # every number cut into digits
