"""Ship a trained demo model into the package: `python -m ernie45.demo.ship runs/demo-omni/final`.

The weights are stored in bf16 (about 29 MB for 14M parameters); `ernie45.LLM()` computes in fp32 on CPU.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import load
from ..checkpoint.chat_ready import make_chat_ready
from . import DEMO_DIR

KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "preprocessor_config.json", "chat_template.jinja")  # fmt: skip


def ship(src: str | Path, dst: Path = DEMO_DIR) -> Path:
    src = Path(src)
    model = load(src).to(torch.bfloat16)
    for name, p in model.named_parameters():  # the router stays fp32 (docs/architecture.md, pitfall 3)
        if name.endswith(("gate.weight", "e_score_correction_bias")):
            p.data = p.data.float()
    model.config.dtype = torch.bfloat16
    dst.mkdir(parents=True, exist_ok=True)
    for f in dst.glob("*"):
        if f.name != "README.md":
            f.unlink()
    model.generation_config.do_sample = False  # the demo answers greedily by default
    model.save_pretrained(dst)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    make_chat_ready(dst)
    return dst


if __name__ == "__main__":
    print(ship(sys.argv[1]))
