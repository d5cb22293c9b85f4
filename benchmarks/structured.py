"""Decode speed with and without a grammar: the cost of structured outputs (llguidance's per-step token mask,
applied per request in the scheduler), side by side in one run.

    python benchmarks/structured.py                 # 0.3B shapes, bf16, batch 1 and 8, 64 new tokens

The constrained rows decode under a regex that allows any 4,000 lowercase letters and spaces (so the answer never
ends early) and a JSON schema with one long string field. Decode tok/s = batch x (new - 1) / (time for new tokens
- time to the first token). Random weights. The tokenizer has ERNIE 4.5's vocabulary size (103,000 pieces:
byte fallback and letter strings with and without the word-start mark), since the mask's cost grows with it.
"""

from __future__ import annotations

import argparse
import itertools
import string
import tempfile
from pathlib import Path

import torch
from decode import make_checkpoint, timed
from machine import cpu_name

from ernie45.engine import LLM, SamplingParams
from ernie45.engine.structured import StructuredOutputs
from ernie45.runtime import hugepages

CONSTRAINTS = {
    "free": None,
    "regex": StructuredOutputs(regex="[a-z ]{4000}"),
    "json schema": StructuredOutputs(
        json={"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}
    ),  # fmt: skip
}


def write_large_tokenizer(path: Path, size: int = 103_000) -> None:
    """A Unigram tokenizer of `size` pieces in `path`, replacing the checkpoint's small one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    for n in itertools.count(1):
        for combo in itertools.product(string.ascii_lowercase, repeat=n):
            pieces += ["".join(combo), "\u2581" + "".join(combo)]
            if len(pieces) >= size:
                break
        if len(pieces) >= size:
            break
    tok = Tokenizer(models.Unigram([(p, -float(len(p))) for p in pieces], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    for old in path.glob("tokenizer*"):
        old.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(path)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint("0.3b", Path(tmp) / "ckpt")
        write_large_tokenizer(path)
        llm = LLM(path, dtype=torch.bfloat16)
        hugepages.wait()
        vocab = len(llm.processor.tokenizer)
        rows = []
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(100, 1000, (batch, 256), generator=torch.Generator().manual_seed(1)).tolist()
            for name, so in CONSTRAINTS.items():

                def run(n: int, so=so, ids=ids):
                    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, structured_outputs=so)
                    return lambda: llm.generate(ids, params)

                run(2)()  # warm-up
                first, whole = timed(run(1)), timed(run(args.new))
                rows.append((batch, name, batch * (args.new - 1) / (whole - first)))
                print(f"  batch {batch} {name}: {rows[-1][2]:.1f} tok/s", flush=True)
    print(f"\n0.3b shapes, bf16, greedy, {args.new} new tokens; tokenizer vocab {vocab}; CPU: {cpu_name()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'batch':>5} {'constraint':<12} {'decode tok/s':>12} {'vs free':>8}")
    free = {b: v for b, n, v in rows if n == "free"}
    for batch, name, value in rows:
        print(f"{batch:>5} {name:<12} {value:>12.1f} {value / free[batch]:>7.2f}x")


if __name__ == "__main__":
    main()
