"""Decode and prefill speed: ernie45 (fp32, bf16, int8, int4; eager and with the decode step compiled; as shipped,
with all its own CPU decode kernels ("own kernels"), with torch's only ("torch kernels"), int4 on torch's kernel
("torch kernel"), without the fused decode ops ("unfused"), with them but each layer op by op instead of two
calls ("op by op"; also a MoE layer's half), op by op with bf16 experts on torch's grouped matmul ("grouped
experts"), and on 4 KB pages) against transformers eager and llama.cpp, side by side.

    python benchmarks/decode.py                 # ERNIE-4.5-0.3B shapes, batch 1, prompt 512, 128 new tokens
    python benchmarks/decode.py --shape 21b-4l  # the 21B-A3B shapes cut to 4 layers (about 5 GB in bf16)
    python benchmarks/decode.py --batch 8 --prompt 2048 --new 64
    python benchmarks/decode.py --rounds 3 --only "ernie45 bf16,llama.cpp BF16"  # medians of interleaved runs

Random weights (speed does not depend on them). At batch 1 both speeds come from one streamed answer: prefill
tok/s = prompt tokens / time to the first token, decode tok/s = the tokens after the first / the time from the
first to the last (llama.cpp's rows time their steps the same way; at a long prompt the difference of two
prefills' times would swamp the decode's). At batch > 1, decode tok/s = batch x (new - 1) / (time for new tokens -
time to the first token). The bound column is the memory-bandwidth limit: measured read bandwidth / weight bytes
read per decode step (a long prompt's KV cache is read too: the bound leaves it out). The llama.cpp rows (the
same checkpoint as GGUF BF16, Q8_0, Q4_0, through llama-cpp-python) appear once `benchmarks/setup_llamacpp.sh`
has installed it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import llamacpp
import torch
from machine import cpu_name, read_bandwidth

from ernie45.runtime import decode_stack, hugepages, kernels
from ernie45.runtime.fused import FastExpertGroup, FusedAttention, FusedMoEBlock, FusedSwiGLU


def make_checkpoint(shape: str, out: Path) -> Path:
    """A random checkpoint in the official layout, written by transformers (bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ernie45 import presets
    from ernie45.official_config import to_official

    name = {"0.3b": "ernie-4.5-0.3b", "21b-4l": "ernie-4.5-21b-a3b"}[shape]
    over = {"num_hidden_layers": 4, "moe_layer_end_index": 3} if shape == "21b-4l" else {}
    d = to_official(presets.get(name, **over))
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chat_fixtures import write_spm_tokenizer  # any tokenizer will do (prompts are token ids); the GGUF

    write_spm_tokenizer(out)  # converter wants a sentencepiece model, as the official checkpoints ship
    return out


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_ernie45(path: Path, dtype, quant: str | None, batch: int, prompt: int, new: int, compile: bool = False):
    from ernie45.engine import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, quantization=quant, compile=compile)
    hugepages.wait()  # the weights on 2 MB pages before timing
    print(f"    runtime: {llm.report.summary()}", flush=True)
    ids = torch.randint(100, 1000, (batch, prompt), generator=torch.Generator().manual_seed(1)).tolist()

    def run(n):
        return lambda: llm.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    t = time.perf_counter()
    if batch > 1 or compile:
        run(2)()  # warm-up (and, compiled, the compile)
    else:  # warm-up on a short prompt: the timed answer below has the long one
        llm.generate(ids[0][:64], SamplingParams(max_tokens=2))
    if compile:
        print(f"    compile + first call: {time.perf_counter() - t:.0f} s", flush=True)
        if llm.decoder.failed:
            print(f"    compile failed, eager numbers: {llm.decoder.failed}", flush=True)
    if batch == 1:  # one streamed answer: the prefill to its first token, the decode from then on (at a long
        # prompt the difference of two prefills' times, their noise, would swamp the decode's)
        first, decode = min(streamed(llm, ids[0], new) for _ in range(1 if prompt >= 4096 else 2))
        return prompt / first, decode, bytes_per_step(llm.model, batch)
    first = timed(run(1))
    whole = timed(run(new), repeat=1)
    return batch * prompt / first, batch * (new - 1) / (whole - first), bytes_per_step(llm.model, batch)


def streamed(llm, ids: list[int], new: int) -> tuple[float, float]:
    """(seconds to the first token, decode tok/s after it) of one streamed greedy answer."""
    from ernie45.engine import SamplingParams

    gc.collect()
    t = time.perf_counter()
    start, after = None, 0
    for delta in llm.stream(ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)):
        if start is None and delta.token_ids:
            start = time.perf_counter()
        elif start is not None:
            after += len(delta.token_ids)
    return start - t, after / (time.perf_counter() - start)


@contextlib.contextmanager
def variant(row: str) -> Iterator[None]:
    """The engine as the row's name says: all own kernels, torch's only, int4 on torch's kernel, 4 KB pages,
    without the fused decode ops (RMSNorm, RoPE, SwiGLU's product and attention as torch's ops, the bf16 matvec
    kernel kept), with them but each layer op by op (no layer half as one call), layer by layer (each half one call,
    but a dense stack not as one call), op by op with a MoE layer's bf16 experts on torch's grouped matmul instead
    of the matvec kernel, or as shipped."""
    names = {"own kernels": ("ERNIE45_CPU_KERNELS", "1"), "torch kernels": ("ERNIE45_CPU_KERNELS", "0"),
             "torch kernel": ("ERNIE45_CPU_KERNELS", "bf16"), "4K pages": ("ERNIE45_HUGEPAGES", "0")}  # fmt: skip
    changed = dict(v for k, v in names.items() if row.endswith(k))
    before = {k: os.environ.get(k) for k in changed}
    os.environ.update(changed)
    kernels.kernel.cache_clear()
    halves = {cls: cls.decode_block for cls in (FusedAttention, FusedSwiGLU, FusedMoEBlock)}
    fused, reads, stack = kernels.fused, FastExpertGroup.kernel_reads, decode_stack.step
    if row.endswith("unfused"):
        kernels.fused = lambda *tensors: False
    if row.endswith(("op by op", "grouped experts")):  # the fused ops, but no layer half as one call
        for cls in halves:
            cls.decode_block = lambda *args: None
    if row.endswith(("layer by layer", "op by op", "grouped experts")):
        decode_stack.step = lambda *args: None
    if row.endswith("grouped experts"):  # and the bf16 experts through torch's grouped matmul, as before
        FastExpertGroup.kernel_reads = lambda *args: False
    try:
        yield
    finally:
        for cls, half in halves.items():
            cls.decode_block = half
        kernels.fused, FastExpertGroup.kernel_reads, decode_stack.step = fused, reads, stack
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
        kernels.kernel.cache_clear()


def bytes_per_step_share(path: Path, batch: int) -> float:
    """The share of a checkpoint's weight bytes one decode step reads (for the GGUF rows' bound)."""
    from ernie45.checkpoint import build_on_meta
    from ernie45.official_config import read_config

    model = build_on_meta(read_config(path)[0])
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return bytes_per_step(model, batch) / total


def bytes_per_step(model, batch: int) -> float:
    """Weight bytes one decode step reads: all but the embedding table, routed experts at the share a step hits."""
    from ernie45.runtime.packed import PackedLinear
    from ernie45.runtime.quant import QuantLinear

    c = model.config
    groups = c.expert_groups or []
    hit = min(1.0, batch * c.moe_k / groups[0]["num_experts"]) if groups else 1.0  # text tokens: the text group
    total = 0.0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name or "vision" in name or "audio" in name or "resampler" in name:
            continue
        routed = ".groups." in name and not name.endswith(("gate.weight", "e_score_correction_bias"))
        total += t.numel() * t.element_size() * (hit if routed else 1.0)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is not None and head is model.model.embed_tokens.weight:  # tied: the table is read as the LM head
        total += head.numel() * head.element_size()
    total += sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, PackedLinear))
    for name, m in model.named_modules():  # int8 codes held in FBGEMM's packing (not a buffer)
        if isinstance(m, QuantLinear) and m.dynamic is not None:
            total += m.in_features * m.out_features * (hit if ".groups." in name else 1.0)
    return total


def bench_transformers(path: Path, dtype, batch: int, prompt: int, new: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.randint(100, 1000, (batch, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def run(n):
        def go():
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        return go

    run(2)()
    first = timed(run(1))
    whole = timed(run(new), repeat=1)
    return batch * prompt / first, batch * (new - 1) / (whole - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["0.3b", "21b-4l"], default="0.3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma list of rows to run (e.g. 'ernie45 bf16,transformers bf16')")
    p.add_argument("--rounds", type=int, default=1, help="run every row this many times, rows interleaved; the "
                   "table gives each row's median and range (a host whose bandwidth drifts needs it)")  # fmt: skip
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.new < 2:
        p.error("--new: at least 2 (decode speed is timed from the first token to the last)")
    torch.set_num_threads(args.threads)
    bw_small, bw = read_bandwidth()
    bw = max(bw, bw_small)
    rows = [("ernie45 fp32", torch.float32, None), ("ernie45 bf16", torch.bfloat16, None),
            ("ernie45 int8", torch.float32, "int8"), ("ernie45 int4", torch.float32, "int4"),
            ("ernie45 int8 bf16", torch.bfloat16, "int8"), ("ernie45 int4 bf16", torch.bfloat16, "int4"),
            ("ernie45 bf16 compiled", torch.bfloat16, None), ("ernie45 int8 compiled", torch.float32, "int8"),
            ("ernie45 int4 compiled", torch.float32, "int4"),
            ("ernie45 int8 own kernels", torch.float32, "int8"), ("ernie45 int4 own kernels", torch.float32, "int4"),
            ("ernie45 bf16 torch kernels", torch.bfloat16, None), ("ernie45 int8 torch kernels", torch.float32, "int8"),
            ("ernie45 int4 torch kernels", torch.float32, "int4"), ("ernie45 bf16 4K pages", torch.bfloat16, None),
            ("ernie45 bf16 unfused", torch.bfloat16, None), ("ernie45 int4 unfused", torch.float32, "int4"),
            ("ernie45 bf16 layer by layer", torch.bfloat16, None),
            ("ernie45 bf16 op by op", torch.bfloat16, None), ("ernie45 int4 op by op", torch.float32, "int4"),
            ("ernie45 bf16 grouped experts", torch.bfloat16, None),
            ("ernie45 int4 torch kernel", torch.float32, "int4"),
            ("transformers fp32", torch.float32, "hf"), ("transformers bf16", torch.bfloat16, "hf")]  # fmt: skip
    keep = {s.strip() for s in args.only.split(",")}
    why_not = llamacpp.available()
    if why_not is None:
        rows += [(f"llama.cpp {f}", None, f) for f in llamacpp.FORMATS]
    else:
        print(f"no llama.cpp rows: {why_not}")
    if args.only:
        rows = [r for r in rows if r[0] in keep]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in rows}
    nbytes_of: dict[str, float | None] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.shape, Path(tmp) / "ckpt")
        ggufs: dict[str, Path] = {}
        for round_ in range(args.rounds):
            for name, dtype, quant in rows:
                if quant in llamacpp.FORMATS:
                    gguf = ggufs[quant] = ggufs.get(quant) or llamacpp.convert(path, Path(tmp), quant)
                    pre, dec, note = llamacpp.bench(gguf, args.batch, args.prompt, args.new, args.threads)
                    if note and round_ == 0:
                        notes.append(f"{name}: {note}")
                    if name not in nbytes_of:  # (the file's share a step reads: the same every round)
                        nbytes_of[name] = gguf.stat().st_size * bytes_per_step_share(path, args.batch)
                elif quant == "hf":
                    pre, dec = bench_transformers(path, dtype, args.batch, args.prompt, args.new)
                    nbytes_of[name] = None
                else:
                    compiled = name.endswith("compiled")
                    with variant(name):
                        pre, dec, nbytes_of[name] = bench_ernie45(path, dtype, quant, args.batch, args.prompt,
                                                                  args.new, compiled)  # fmt: skip
                runs[name].append((pre, dec))
                tag = f" (round {round_ + 1})" if args.rounds > 1 else ""
                print(f"  {name}{tag}: prefill {pre:.1f} tok/s, decode {dec:.1f} tok/s", flush=True)
    results = {name: (statistics.median(p for p, _ in r), statistics.median(d for _, d in r), nbytes_of[name])
               for name, r in runs.items()}  # fmt: skip
    base = results.get("transformers bf16", (None, None))[1]
    print(f"\nCPU: {cpu_name()}")
    print(f"{args.shape} shapes, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.threads} threads; read bandwidth {bw_small / 1e9:.1f} GB/s on 4 KB pages, "
          f"{bw / 1e9:.1f} on 2 MB pages (the bound uses the faster)")  # fmt: skip
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds, rows interleaved; decode range min-max")
    head = ("engine", "prefill tok/s", "decode tok/s", "vs hf bf16", "bound tok/s", "% bound", "decode range")
    print(f"{head[0]:22} {head[1]:>13} {head[2]:>12} {head[3]:>10} {head[4]:>11} {head[5]:>7}"
          + (f" {head[6]:>13}" if args.rounds > 1 else ""))  # fmt: skip
    for name, (pre, dec, nbytes) in results.items():
        bound = bw / nbytes * args.batch if nbytes else None
        ratio = f"{dec / base:.2f}x" if base else "-"
        pct = f"{dec / bound:.0%}" if bound else "-"
        decs = [d for _, d in runs[name]]
        spread = f" {min(decs):6.1f}-{max(decs):<6.1f}" if args.rounds > 1 else ""
        print(f"{name:22} {pre:13.1f} {dec:12.1f} {ratio:>10} {bound or 0:11.1f} {pct:>7}{spread}")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
