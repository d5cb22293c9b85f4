"""The embedded demo model: its synthetic tasks, tokenizer, training data and evaluation."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-omni"


class MissingDataSource(RuntimeError):
    """A Debian package the demo's data is made from is not installed (the message says which)."""


def default_model_path() -> Path:
    """Where the shipped demo model lives (inside the package, so every install has it)."""
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing from {DEMO_DIR}; reinstall ernie45, or pass --model DIR"
        )
    return DEMO_DIR
