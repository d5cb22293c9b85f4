"""Where the embedded demo model lives: inside the package, so every install has it (`ernie45.LLM()`'s default)."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo-omni"


def default_model_path() -> Path:
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing from {DEMO_DIR}; reinstall ernie45, or pass --model DIR"
        )
    return DEMO_DIR
