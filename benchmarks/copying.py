"""How fast a fresh trunk learns to copy from its context, with and without the attention guidance: the copying
phase (`ernie45.demo.induction`: random runs given twice, each row at its own distance, every trunk parameter
learning) on fresh models of the demo-omni preset's shape or a smaller one, the same seed and steps side by side;
prints the copying score of each and the phase's time.

    python benchmarks/copying.py --layers 2 --width 128 --head-dim 32 --length 12 --steps 300
    python benchmarks/copying.py                          # the demo-omni preset (6 layers, 256 wide, MoE)
    python benchmarks/copying.py --guide 300 --hold 2     # and a run with layers 2.. held at the identity meanwhile

Unguided, induction arrives as a sudden change (a few percent for hundreds of steps, then most of the run within
~100 steps), so a run that ends flat says "not within these steps", not "never".
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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    ap.add_argument("--width", type=int, default=None, help="hidden size (default: the preset's 256)")
    ap.add_argument("--head-dim", type=int, default=None, help="head size (default: the preset's 64)")
    ap.add_argument("--length", type=int, default=24, help="longest run given twice (default 24)")
    ap.add_argument("--cosine", action="store_true", help="cosine decay after the warm-up (default: a constant rate)")
    ap.add_argument("--guide", type=int, default=None, help="steps with the attention guidance (default: all)")
    ap.add_argument(
        "--hold",
        type=int,
        default=0,
        help="also a run with the layers from this index on held at the identity while guided",
    )
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = {k: v for k, v in (("num_hidden_layers", a.layers), ("hidden_size", a.width), ("head_dim", a.head_dim))
             if v is not None}  # fmt: skip
    if a.width:
        shape["intermediate_size"] = 2 * a.width
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    proc = ernie45.load_processor(default_model_path())
    print(
        f"# {cpu_name()}, {torch.get_num_threads()} threads; demo-omni preset {shape or 'as it is'}; {a.steps} "
        f"steps of batch {a.batch}, runs up to {a.length} tokens, lr {a.lr}{', cosine' if a.cosine else ''}\n"
    )
    print("| guided steps | layers held from | copying score before | after | phase s |\n|---:|---:|---:|---:|---:|")
    guided = a.steps if a.guide is None else a.guide
    for guide, hold in ([(guided, a.hold)] if a.hold else []) + [(guided, 0), (0, 0)]:
        torch.manual_seed(0)
        model = Ernie45ForConditionalGeneration(ernie45.presets.get("demo-omni", **shape))
        before = copy_score(model, proc.tokenizer, length=a.length)
        start = time.perf_counter()
        pretrain_copying(
            model,
            proc.tokenizer,
            steps=a.steps,
            batch=a.batch,
            length=a.length,
            lr=a.lr,
            everything=True,
            cosine=a.cosine,
            guide=guide,
            hold=hold,
            log_every=100,
        )
        print(
            f"| {guide} | {hold or '-'} | {before:.1%} | {copy_score(model, proc.tokenizer, length=a.length):.1%} | "
            f"{time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
