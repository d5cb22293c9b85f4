"""The embedded demo model: its synthetic tasks, tokenizer, training data and evaluation."""

from __future__ import annotations

from ..embedded import DEMO_DIR, default_model_path

__all__ = ["DEMO_DIR", "MissingDataSource", "default_model_path"]


class MissingDataSource(RuntimeError):
    """A Debian package the demo's data is made from is not installed (the message says which)."""


from . import plugins  # noqa: E402,F401  (registers the demo's data source and tokenizer with `train`)
