"""What a recipe can name besides files: data sources, tokenizer builders and tokenizer options, registered by
the packages above `train` (the demo registers its own: `ernie45.demo.plugins`). So training knows no client by
name; a recipe's `data: {demo: {...}}` finds the source the demo registered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataSource:
    """rows(processor, spec, max_tokens, rows, seed) -> a dataset of packed rows; prepare(model, processor, spec,
    seed) runs before training (None: nothing to do)."""

    rows: Callable[..., Any]
    prepare: Callable[..., None] | None = None


SOURCES: dict[str, DataSource] = {}
TOKENIZERS: dict[str, Callable[[Path], Path]] = {}  # model.tokenizer: NAME -> build it into a directory
TOKENIZER_OPTIONS: dict[str, Callable[[Any], int]] = {}  # model.<option>: true -> change the tokenizer


def register_source(name: str, source: DataSource) -> None:
    SOURCES[name] = source


def register_tokenizer(name: str, build: Callable[[Path], Path]) -> None:
    TOKENIZERS[name] = build


def register_tokenizer_option(name: str, apply: Callable[[Any], int]) -> None:
    TOKENIZER_OPTIONS[name] = apply
