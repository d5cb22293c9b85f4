"""`ernie45 train CONFIG.yaml [key=value ...] [--resume]`: a training run from a recipe file.

Overrides use dotted keys, e.g. ``train.max_steps=20 data.pack=false losses.load_balance=0.01``; values are
read as YAML (numbers, booleans, lists).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .errors import UsageError


def _set(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_recipe(path: str, overrides: list[str]) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such recipe file")
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{file} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"override {item!r}: write key=value, e.g. train.max_steps=20")
        _set(cfg, key, yaml.safe_load(raw))
    base = file.parent  # relative data / model paths are relative to the recipe
    for section, key in (("model", "path"), ("model", "tokenizer")):
        value = cfg.get(section, {}).get(key)
        if value and not Path(value).is_absolute() and (base / value).exists():
            cfg[section][key] = str(base / value)
    data = cfg.setdefault("data", {})
    files = data.get("train", [])
    files = [files] if isinstance(files, str) else files
    data["train"] = [str(base / f) if not Path(f).is_absolute() and (base / f).exists() else f for f in files]
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import DataError, run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_recipe(args.config, args.overrides)
    try:
        final = run(cfg, resume=args.resume)
    except (DataError, ValueError) as e:
        raise UsageError(str(e)) from None
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"trained model written to {final}")


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits: a gloo group left to the exit's
    teardown now and then aborts the process (SIGABRT) after the work is done, and torchrun reports a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_merge(args: argparse.Namespace) -> None:
    import shutil

    from ..train.lora_merge import merge_adapters

    for what, path in (("base", args.base), ("adapters", args.adapters)):
        if not Path(path).is_dir():
            raise UsageError(f"{what} {path}: no such directory")
    try:
        model = merge_adapters(args.base, args.adapters)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    model.save_pretrained(out)
    for f in Path(args.adapters).iterdir():  # the tokenizer and processor files the training run wrote
        if f.is_file() and not f.name.startswith("adapter_") and f.name != "README.md":
            shutil.copy2(f, out / f.name)
    print(f"merged model written to {out} (bf16; `ernie45 export {out} DIR` writes the official layout)")


def add_commands(sub) -> None:
    m = sub.add_parser("merge", help="fold LoRA adapters (also those trained on a quantized base) into the base")
    m.add_argument("base", metavar="BASE", help="the float checkpoint the adapters were trained on")
    m.add_argument("adapters", metavar="ADAPTERS", help="the training run's final directory (adapter_*.* files)")
    m.add_argument("out", metavar="OUT", help="where the merged model goes")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser("train", help="train or fine-tune from a recipe (SFT, pretraining, DPO, LoRA)")
    t.add_argument("config", metavar="CONFIG.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=20")
    t.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in output_dir")
    t.set_defaults(func=cmd_train)
