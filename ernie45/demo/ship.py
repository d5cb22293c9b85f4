"""Ship a trained demo model into the package: `python -m ernie45.demo.ship runs/demo-omni/final`.

The weights are stored in bf16 (about 29 MB for 14M parameters); `ernie45.LLM()` computes in fp32 on CPU.
`python -m ernie45.demo.ship --mtp runs/demo-omni-mtp/final` adds only a trained MTP layer to the shipped
model: its other tensors stay byte for byte what they were, so its answers do not change.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import load
from ..checkpoint.chat_ready import make_chat_ready
from ..checkpoint.load import cast
from . import DEMO_DIR

KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "preprocessor_config.json", "chat_template.jinja")  # fmt: skip


def ship(src: str | Path, dst: Path = DEMO_DIR) -> Path:
    src = Path(src)
    model = cast(load(src), torch.bfloat16)
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


def ship_mtp(src: str | Path, dst: Path = DEMO_DIR) -> Path:
    """Write `src`'s MTP tensors (each in the dtype of its trunk twin in the shipped file) into the shipped model
    and say so in its config; nothing else in the file changes."""
    import json

    from safetensors.torch import load_file, save_file

    from ..model.mtp import with_mtp

    shipped = load_file(dst / "model.safetensors")
    trained = load(src, dtype=torch.float32)
    if not trained.config.num_nextn_predict_layers:
        raise SystemExit(f"{src}: the model has no MTP layer (train one with recipes/demo-omni-mtp.yaml)")
    layout = with_mtp(load(dst), trained.config.num_nextn_predict_layers)  # the dtypes the shipped file implies
    dtypes = {n: p.dtype for n, p in layout.named_parameters()}
    for name, t in trained.state_dict().items():
        if ".mtp_" in name:
            shipped[name] = t.to(dtypes[name]).contiguous()
    save_file(shipped, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["num_nextn_predict_layers"] = trained.config.num_nextn_predict_layers
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


if __name__ == "__main__":
    print(ship_mtp(sys.argv[2]) if sys.argv[1] == "--mtp" else ship(sys.argv[1]))
