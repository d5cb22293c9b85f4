"""Speculative decoding against plain decoding, side by side in one run, batch 1, greedy: prompt lookup
(n-gram, k drafts) and, where the model has an MTP layer, MTP drafts (by default one a step; `--mtp 1,2,3`: a
column per count, the block chained on its own output past the first).

    python benchmarks/speculative.py            # the embedded demo model
    python benchmarks/speculative.py --model DIR --k 4 --mtp 1,3

Prompts of four kinds: answers that copy from the prompt (a document's lines asked back, a CSV table read
out), answers that repeat themselves, answers that copy nothing, and the demo's own answers (worked arithmetic,
document questions, summaries of a short report) at their natural length. Decode tok/s = new tokens / wall time
of the whole answer (one prefill included in every column). Acceptance = drafted tokens kept / drafted tokens.
"""

from __future__ import annotations

import argparse
import random
import time

from machine import cpu_name

from ernie45.demo.jobtasks import summary_task
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
# the demo model's own answers, each to its end (no ignore_eos): what MTP drafting is for
ANSWERS = {
    "arithmetic": [f"What is {a} {op} {b}?" for a, op, b in ((59, "plus", 73), (84, "minus", 27), (46, "plus", 38),
                                                             (91, "minus", 56), (7, "times", 8), (68, "plus", 97))],
    "documents": [{"role": "user", "content": [{"type": "file", "file": TABLE.encode()},
                                               {"type": "text", "text": q}]}
                  for q in ("What is the value for C?", "Which item has the highest value?",
                            "What is the value for A?", "Which item has the lowest value?")],
    # "Summarize the document." on reports the demo's summary family draws, from seeds no training row uses
    "summaries": [summary_task(random.Random(900_000_001 + i))[1][0] for i in range(4)],
}  # fmt: skip


def run(llm: LLM, prompts: list, k: int | str, tokens: int, to_end: bool = False) -> tuple[float, int, float]:
    """(seconds, new tokens, acceptance) over `prompts` answered one after another; k > 0: n-gram drafts, "mtpN":
    N MTP drafts a step. to_end: each answer to its own end (else exactly `tokens` tokens)."""
    mtp = isinstance(k, str)
    spec = {"method": "mtp", "num_speculative_tokens": int(k[3:])} if mtp else {
        "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}  # fmt: skip
    config = SpeculativeConfig.parse(spec) if k else None
    engine = BatchEngine(llm, max_batch=1, max_len=2048, thread=False, speculative=config)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=not to_end)
    seconds, new = 0.0, 0
    for prompt in prompts:
        if isinstance(prompt, str):
            enc = llm.processor.encode_chat([{"role": "user", "content": prompt}]) if to_end else {
                "input_ids": llm.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]}  # fmt: skip
        else:
            enc = llm.processor.encode_chat([prompt])
        start = time.perf_counter()
        handle = engine.submit(enc, params)
        while not handle.request.finished:
            engine.step()
        seconds += time.perf_counter() - start
        new += len(handle.request.row.token_ids)
    drafted = engine.stats["draft_tokens"]
    return seconds, new, engine.stats["accepted_tokens"] / max(drafted, 1)


def verify_cost(llm: LLM, prompt: int = 60, runs: int = 600) -> str:
    """Median ms of one forward of T = 1, 2, 3 tokens after a `prompt`-token cache (T = 1: a decode step; T > 1: a
    verify), the T values interleaved run by run."""
    import statistics

    import torch

    from ernie45.engine.cache import StaticKVCache

    model = llm.model
    cache = StaticKVCache.for_model(model, 1, prompt + 8)
    times: dict[int, list[float]] = {1: [], 2: [], 3: []}
    with torch.inference_mode():
        model.model(input_ids=torch.randint(100, 1000, (1, prompt)), cache=cache)
        for _ in range(runs):
            for t in times:
                ids, mask = torch.randint(100, 1000, (1, t)), torch.ones(1, prompt + t, dtype=torch.long)
                cache.lengths = [prompt] * len(cache.lengths)
                start = time.perf_counter()
                model.model(input_ids=ids, cache=cache, attention_mask=mask)
                times[t].append(time.perf_counter() - start)
    return "  ".join(f"T = {t}: {statistics.median(v) * 1e3:.2f} ms" for t, v in times.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per step")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per answer")
    ap.add_argument("--repeat", type=int, default=5, help="runs per cell, methods interleaved; the fastest is shown")
    ap.add_argument("--mtp", default="1", help="comma list of MTP drafts a step, a column each (default 1)")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as stored; the demo model is fp32)")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    mtp = bool(llm.model.config.num_nextn_predict_layers)
    model = f"{args.model or 'demo model'}, {llm.model.dtype}"
    print(f"{cpu_name()}; {model}; batch 1, greedy, {args.tokens} new tokens, k = {args.k}")
    head = f"{'prompt':16} {'plain tok/s':>12} {'ngram tok/s':>12} {'ratio':>6} {'accepted':>9}"
    mtp_ks = [int(v) for v in args.mtp.split(",")] if mtp else []
    print(head + "".join(f" {f'mtp{k} tok/s':>11} {'ratio':>6} {'accepted':>9}" for k in mtp_ks))
    cases = [(name, [p], False) for name, p in PROMPTS.items()] + [(n, ps, True) for n, ps in ANSWERS.items()]
    print(f"one forward after a 60-token prompt (median of 600): {verify_cost(llm)}")
    methods = [0, args.k, *(f"mtp{k}" for k in mtp_ks)]
    for name, prompts, to_end in cases:
        for k in methods:
            run(llm, prompts[:1], k, 8)  # warm-up
        best: dict = {}
        for _ in range(args.repeat):  # the methods interleaved, each its fastest run: a busy moment hits one run
            for k in methods:
                took = run(llm, prompts, k, args.tokens, to_end)
                best[k] = min(best.get(k, took), took)
        plain_s, n, _ = best[0]
        line = f"{name:16} {n / plain_s:12.1f}"
        for k in methods[1:]:
            spec_s, m, acceptance = best[k]
            assert m == n, (name, k, m, n)  # greedy answers are the same answers
            line += f" {m / spec_s:{12 if k == args.k else 11}.1f} {plain_s / spec_s:5.2f}x {acceptance:9.0%}"
        print(line)


if __name__ == "__main__":
    main()
