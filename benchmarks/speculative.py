"""Prompt-lookup speculative decoding against plain decoding, side by side in one run, batch 1, greedy.

    python benchmarks/speculative.py            # the embedded demo model
    python benchmarks/speculative.py --model DIR --k 4

Prompts of three kinds: answers that copy from the prompt (a document's lines asked back, a CSV table read
out), answers that repeat themselves, and answers that copy nothing (the draft is then rarely found, and the
row costs what it did). Decode tok/s = new tokens / wall time of the whole answer (one prefill included in
both columns). Acceptance = drafted tokens kept / drafted tokens.
"""

from __future__ import annotations

import argparse
import time

from machine import cpu_name

from ernie45.engine import LLM, SamplingParams
from ernie45.engine.batcher import BatchEngine
from ernie45.engine.speculative import SpeculativeConfig

TABLE = "item,value\nA,31\nB,17\nC,58\nD,44\nE,12\n"
PROMPTS = {
    "copy a list": "Repeat exactly: red star, blue circle, green square, yellow triangle, red star, blue circle, "
    "green square, yellow triangle, red star, blue circle, green square, yellow triangle.",
    "read a table": {
        "role": "user",
        "content": [{"type": "file", "file": TABLE.encode()}, {"type": "text", "text": "Write the table out."}],
    },  # fmt: skip
    "repeats itself": "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta alpha beta",
    "copies nothing": "What is 23 plus 48?",
}


def run(llm: LLM, prompt, k: int, tokens: int) -> tuple[float, int, float]:
    """(seconds, new tokens, acceptance) for one answer, speculative with k > 0."""
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    config = SpeculativeConfig.parse(spec) if k else None
    engine = BatchEngine(llm, max_batch=1, max_len=2048, thread=False, speculative=config)
    if isinstance(prompt, str):
        enc = {"input_ids": llm.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]}
    else:
        enc = llm.processor.encode_chat([prompt])
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    handle = engine.submit(enc, params)
    while not handle.request.finished:
        engine.step()
    seconds = time.perf_counter() - start
    drafted = engine.stats["draft_tokens"]
    return seconds, len(handle.request.row.token_ids), engine.stats["accepted_tokens"] / max(drafted, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per step")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per answer")
    args = ap.parse_args()
    llm = LLM(args.model)
    print(f"{cpu_name()}; {args.model or 'demo model'}; batch 1, greedy, {args.tokens} new tokens, k = {args.k}")
    print(f"{'prompt':16} {'plain tok/s':>12} {'ngram tok/s':>12} {'ratio':>6} {'accepted':>9}")
    for name, prompt in PROMPTS.items():
        run(llm, prompt, 0, 8)  # warm-up
        plain_s, n, _ = run(llm, prompt, 0, args.tokens)
        spec_s, m, acceptance = run(llm, prompt, args.k, args.tokens)
        assert m == n
        print(f"{name:16} {n / plain_s:12.1f} {m / spec_s:12.1f} {plain_s / spec_s:5.2f}x {acceptance:9.0%}")


if __name__ == "__main__":
    main()
