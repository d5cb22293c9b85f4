"""How fast a fresh trunk learns to copy from its context: the copying phase (`ernie45.demo.induction`, random
runs given twice at varying distances, every trunk parameter learning) on a fresh model of the demo-omni preset's
shape, with the shape and the batch as options; prints the phase's curve and the copying score at the end.

    python benchmarks/copying.py                          # the demo-omni preset (6 layers, 256 wide, MoE)
    python benchmarks/copying.py --batch 16                # half the batch
    python benchmarks/copying.py --layers 2 --width 128 --head-dim 32
    python benchmarks/copying.py --guide 0                 # without the attention guidance

Unguided, induction arrives as a sudden change (a few percent for hundreds of steps, then most of the run within ~100
steps), so a run that ends flat says "not within these steps", not "never".
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from machine import cpu_name

import ernie45
from ernie45.demo import default_model_path
from ernie45.demo.induction import copy_score, pretrain_copying
from ernie45.model import Ernie45ForConditionalGeneration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    ap.add_argument("--width", type=int, default=None, help="hidden size (default: the preset's 256)")
    ap.add_argument("--head-dim", type=int, default=None, help="head size (default: the preset's 64)")
    ap.add_argument("--constant", action="store_true", help="a constant rate after the warm-up (default: cosine decay)")
    ap.add_argument("--guide", type=int, default=600, help="steps with the attention guidance (default 600)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = {k: v for k, v in (("num_hidden_layers", a.layers), ("hidden_size", a.width), ("head_dim", a.head_dim))
             if v is not None}  # fmt: skip
    if a.width:
        shape["intermediate_size"] = 2 * a.width
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    proc = ernie45.load_processor(default_model_path())
    model = Ernie45ForConditionalGeneration(ernie45.presets.get("demo-omni", **shape))
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads; demo-omni preset {shape or 'as it is'}; "
          f"batch {a.batch}, lr {a.lr}{' constant' if a.constant else ', cosine decay'}, guide {a.guide}")  # fmt: skip
    start = time.perf_counter()
    pretrain_copying(model, proc.tokenizer, steps=a.steps, batch=a.batch, lr=a.lr, everything=True,
                     cosine=not a.constant, guide=a.guide, log_every=100)  # fmt: skip
    print(f"copying score after {a.steps} steps: {copy_score(model, proc.tokenizer):.1%} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
