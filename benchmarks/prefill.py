"""Prefill speed (prompt tokens per second to the first token): ernie45 against transformers eager, side by side.

    python benchmarks/prefill.py                       # ERNIE-4.5-0.3B shapes, prompts 512 and 2048, batch 1
    python benchmarks/prefill.py --shape 21b-4l --batch 8 --prompts 512

Random weights in the official layout (written by transformers); every row on the same checkpoint in one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from decode import make_checkpoint, timed

ROWS = [("ernie45 fp32", torch.float32, None), ("ernie45 bf16", torch.bfloat16, None),
        ("ernie45 int8", torch.float32, "int8"), ("ernie45 int4", torch.float32, "int4"),
        ("transformers fp32", torch.float32, "hf"), ("transformers bf16", torch.bfloat16, "hf")]  # fmt: skip


def prefill_fn(path: Path, dtype, quant: str | None, ids: torch.Tensor):
    """A callable that runs one prefill (the prompt, then one sampled token)."""
    if quant == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

        def hf():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)

        return hf
    from ernie45.engine import LLM, SamplingParams
    from ernie45.runtime import hugepages

    llm = LLM(path, dtype=dtype, quantization=quant)
    hugepages.wait()  # the weights on 2 MB pages before timing
    print(f"    runtime: {llm.report.summary()}", flush=True)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    return lambda: llm.generate(ids.tolist(), params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["0.3b", "21b-4l"], default="0.3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompts", default="512,2048", help="comma list of prompt lengths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma list of rows to run (e.g. 'ernie45 bf16,transformers fp32')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.prompts.split(",")]
    rows = [r for r in ROWS if not args.only or r[0] in {s.strip() for s in args.only.split(",")}]
    table: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.shape, Path(tmp) / "ckpt")
        for name, dtype, quant in rows:
            for n in lengths:
                ids = torch.randint(100, 1000, (args.batch, n), generator=torch.Generator().manual_seed(1))
                fn = prefill_fn(path, dtype, quant, ids)
                fn()  # warm-up
                table.setdefault(name, []).append(args.batch * n / timed(fn))
                print(f"  {name}, prompt {n}: {table[name][-1]:.1f} tok/s", flush=True)
    print(f"\n{args.shape} shapes, batch {args.batch}, {args.threads} threads; prefill tokens/s (ratio to the "
          "better of transformers fp32 and bf16)")  # fmt: skip
    none = [0.0] * len(lengths)
    fp32, bf16 = table.get("transformers fp32", none), table.get("transformers bf16", none)
    hf = [max(a, b) for a, b in zip(fp32, bf16, strict=True)]
    print(f"{'engine':20} " + " ".join(f"{f'prompt {n}':>20}" for n in lengths))
    for name, speeds in table.items():
        cells = [f"{s:10.1f} ({s / h:.2f}x)" if h else f"{s:10.1f}" for s, h in zip(speeds, hf, strict=True)]
        print(f"{name:20} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
