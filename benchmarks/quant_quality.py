"""What weight-only quantization costs in quality: logit drift and perplexity on a fixed text, against bf16.

    python benchmarks/quant_quality.py                      # the embedded demo model, on its held-out text
    python benchmarks/quant_quality.py --model DIR --text FILE
    python benchmarks/quant_quality.py --decode             # also token by token, through the decode kernels

The fixed text defaults to 200 held-out conversations of the demo's own tasks (text only, seed 424242), so
the perplexity is that of text the model knows the form of. Prints one row per weight format.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch


def default_text(n: int = 200, seed: int = 424242) -> str:
    from ernie45.demo.tasks import PERSONA, text_task

    rng = random.Random(seed)
    lines = [PERSONA]
    for _ in range(n):
        _, messages, answer = text_task(rng)
        lines.append(f"{messages[-1]['content'][-1]['text']} {answer}")
    return "\n".join(lines)


@torch.no_grad()
def logits_of(llm, ids: torch.Tensor, window: int, decode: bool = False) -> torch.Tensor:
    """Next-token logits over the whole text, window by window (fp32 [T, V]); with `decode`, each window token
    by token through a KV cache, as generation runs it (one-row matmuls: the decode kernels)."""
    from ernie45.engine.cache import StaticKVCache

    out = []
    for s in range(0, len(ids), window):
        w = ids[None, s : s + window]
        if not decode:
            out.append(llm.model(input_ids=w).logits[0].float())
            continue
        cache = StaticKVCache.for_model(llm.model, 1, w.shape[1])
        out += [llm.model(input_ids=w[:, t : t + 1], cache=cache).logits[0].float() for t in range(w.shape[1])]
    return torch.cat(out)


def perplexity(logits: torch.Tensor, ids: torch.Tensor, window: int) -> float:
    keep = torch.ones(len(ids) - 1, dtype=torch.bool)
    keep[window - 1 :: window] = False  # a window's last logit has no target inside the window
    nll = torch.nn.functional.cross_entropy(logits[:-1][keep], ids[1:][keep])
    return math.exp(nll.item())


def main() -> None:
    from ernie45.demo import default_model_path
    from ernie45.engine import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--text", default=None, help="a UTF-8 text file (default: the demo's held-out text)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--decode", action="store_true", help="also run each window token by token (decode kernels)")
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    text = Path(args.text).read_text() if args.text else default_text()
    ref_llm = LLM(path, dtype=torch.bfloat16)
    ids = torch.tensor(ref_llm.processor.tokenizer.encode(text, add_special_tokens=False))
    ref = logits_of(ref_llm, ids, args.window)
    ref_logp = ref.log_softmax(-1)
    print(f"{path}: {len(ids)} tokens, window {args.window}; drift against bf16 weights and compute")
    head = ("perplexity", 10), ("Δppl", 8), ("max |Δlogit|", 13), ("mean |Δlogit|", 14), ("KL", 9), ("top-1", 7)
    print(f"{'weights':10} " + " ".join(f"{h:>{w}}" for h, w in head))
    print(f"{'bf16':10} {perplexity(ref, ids, args.window):10.3f}")
    rows = [("fp32", {}), ("int8", {"quantization": "int8"}), ("int4-g32", {"quantization": "int4"}),
            ("int4-g128", {"quantization": "int4-g128"})]  # fmt: skip
    if args.decode:  # the same weights one token at a time: int8 decode quantizes each row to 8 bits
        rows += [(f"{name} dec", {**kw, "decode": True}) for name, kw in rows]
    for name, kw in rows:
        decode = kw.pop("decode", False)
        got = logits_of(LLM(path, dtype=torch.float32, **kw), ids, args.window, decode)
        d = (got - ref).abs()
        kl = (ref_logp.exp() * (ref_logp - got.log_softmax(-1))).sum(-1).mean().item()
        same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        ppl = perplexity(got, ids, args.window)
        base = perplexity(ref, ids, args.window)
        print(f"{name:10} {ppl:10.3f} {ppl / base - 1:+8.2%} {d.max().item():13.4f} {d.mean().item():14.4f} "
              f"{kl:9.5f} {same:7.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
