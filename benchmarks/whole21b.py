"""The whole ERNIE-4.5-21B-A3B (random weights at the real shapes) on this machine: ernie45 int4, loaded straight
from a bf16 checkpoint (each layer quantized as it is read), against llama.cpp Q4_0 of the same weights.

    python benchmarks/whole21b.py --dir /data/ernie45-21b   # ~67 GB free disk at the peak, 24 GB RAM is enough

Stages, each skipped where its output is already there (so a stopped run resumes): the bf16 checkpoint in the
official layout, written tensor by tensor (44 GB; never whole in memory); ernie45 timed in a child process for each
int4 group size of `--groups` (load, time to the first token of a 512-token prompt, decode tok/s over 128 tokens,
peak RSS); a second start: `ernie45 quantize` to a file (timed, its peak RSS), ernie45 started from that file, the
file deleted; llama.cpp's converter to Q8_0 (23 GB); then, because the disk holds the bf16 file and two GGUFs only
with ~80 GB, the bf16 checkpoint is deleted (`--keep-bf16` keeps it) and llama.cpp requantizes Q8_0 to Q4_0 (its
quantizer, as from BF16) and is timed the same way. The rows run one after the other, not interleaved: read them
with the bandwidth line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import llamacpp
import torch
from machine import cpu_name, read_bandwidth

SHARD_BYTES = 2 << 30


def official_tensors() -> tuple[object, list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """The official config of ERNIE-4.5-21B-A3B and its checkpoint's tensors (name, shape, dtype), as transformers
    saves them (one tensor per expert and projection), read from a copy with tiny distinct widths that transformers
    writes, its widths then mapped back to the real ones (so no 44 GB model is ever built)."""
    import tempfile

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from ernie45 import presets
    from ernie45.official_config import to_official

    def official(**over):
        d = to_official(presets.get("ernie-4.5-21b-a3b", **over))
        return AutoConfig.for_model(d.pop("model_type"), **d)

    group = presets.PRESETS["ernie-4.5-21b-a3b"]["expert_groups"][0]
    # hidden 40 -> 2560, dense FFN 56 -> 12288, expert 24 -> 1536, shared experts 48 -> 3072, q 160 -> 2560, kv 32
    # -> 512 (20 and 4 heads of 8 -> of 128); expert counts and the vocabulary stay as they are
    real = {40: 2560, 56: 12288, 24: 1536, 48: 3072, 160: 2560, 32: 512}
    tiny = official(hidden_size=40, intermediate_size=56, head_dim=8, expert_groups=[dict(group, intermediate_size=24)])
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(tiny, dtype=torch.bfloat16).save_pretrained(tmp)
        tensors = []
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    t = st.get_slice(k)
                    dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[t.get_dtype()]
                    tensors.append((k, tuple(real.get(d, d) for d in t.get_shape()), dtype))
    return official(), tensors


def write_checkpoint(out: Path) -> None:
    """Random bf16 weights at ERNIE-4.5-21B-A3B's shapes, official names, shard by shard (norms 1, biases 0)."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chat_fixtures import write_spm_tokenizer

    cfg, tensors = official_tensors()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    write_spm_tokenizer(tmp)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, done, n, start = 0, 0, 0, time.perf_counter()
    total = sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in tensors)

    def flush() -> None:
        nonlocal shard, size, done, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        done += size
        print(f"  {name}: {done / 1e9:.1f} / {total / 1e9:.1f} GB ({time.perf_counter() - start:.0f} s)", flush=True)
        shard, size, n = {}, 0, n + 1

    for name, shape, dtype in tensors:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif "bias" in name:
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen)
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))  # fmt: skip
    tmp.rename(out)


def _memory() -> dict[str, float]:
    """Peak RSS (file pages a load touched count too), and now: RSS and its anonymous part (what the process
    itself holds; a memory-mapped model's file pages are the rest), in GB."""
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon") if k in status}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # (kB on Linux)
    return {"peak RSS GB": peak / 1e6, "RSS GB": kb.get("VmRSS", 0) / 1e6, "anon RSS GB": kb.get("RssAnon", 0) / 1e6}


def run_ernie45(path: Path, prompt: int, new: int, spec: str) -> dict:
    """`spec`: int4 or int4-g64 quantizing the bf16 checkpoint as it loads; "file" for a checkpoint that
    `ernie45 quantize` wrote (a second start)."""
    from decode import streamed

    from ernie45.engine import LLM, SamplingParams
    from ernie45.runtime import hugepages

    t = time.perf_counter()
    llm = LLM(path, dtype=torch.bfloat16, quantization=None if spec == "file" else spec)
    hugepages.wait()
    load = time.perf_counter() - t
    ids = torch.randint(100, 1000, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    llm.generate(ids[:16], SamplingParams(max_tokens=2))
    first, decode = streamed(llm, ids, new)
    return {"load s": load, "first token s": first, "decode tok/s": decode, **_memory()}


def run_llamacpp(gguf: Path, prompt: int, new: int, threads: int) -> dict:
    """As the decode benchmark's llama.cpp rows time it (`llamacpp.timed`), with the load."""
    t = time.perf_counter()
    llm = llamacpp.open_model(gguf, prompt, new, threads)
    load = time.perf_counter() - t
    pre, decode = llamacpp.timed(llm, 1, prompt, new)
    return {"load s": load, "first token s": prompt / pre, "decode tok/s": decode, **_memory()}


def child(stage: str, path: Path, args: argparse.Namespace, *extra: str) -> dict:
    """One engine in its own process (its peak RSS is its own)."""
    sizes = ["--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads)]
    r = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), *sizes, "--child", stage, str(path), *extra],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        killed = " (killed: out of memory?)" if r.returncode == -9 else ""
        raise RuntimeError(f"{stage} failed with exit status {r.returncode}{killed}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="workspace for the checkpoint and the GGUFs")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--groups",
        type=lambda v: [int(g) for g in v.split(",")],
        default=[32, 64],
        help="int4 group sizes of the ernie45 rows (64: 4.5 bits a weight, as Q4_0); the last also "
        "quantized to a file by `ernie45 quantize` and started from it",
    )
    p.add_argument("--keep-bf16", action="store_true", help="keep the bf16 checkpoint (needs ~80 GB of disk)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    from ernie45.runtime.quant import GROUP_SIZES

    if not set(args.groups) <= set(GROUP_SIZES):  # refused before the 44 GB checkpoint is written, not after
        p.error(f"--groups {','.join(map(str, args.groups))}: int4 group sizes are {', '.join(map(str, GROUP_SIZES))}")
    if args.child:
        stage, rest = args.child[0], args.child[1:]
        torch.set_num_threads(args.threads)
        if stage == "ernie45":
            out = run_ernie45(Path(rest[0]), args.prompt, args.new, rest[1])
        else:
            out = run_llamacpp(Path(rest[0]), args.prompt, args.new, args.threads)
        print(json.dumps(out))
        return
    why = llamacpp.available()
    if why:
        p.error(f"the llama.cpp rows cannot run: {why}")
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, q8, q4 = args.dir / "bf16", args.dir / "model-Q8_0.gguf", args.dir / "model-Q4_0.gguf"
    results: dict[str, dict] = {}
    saved = args.dir / "results.json"
    if saved.exists():
        results = json.loads(saved.read_text())
    if not q4.exists():
        if not ckpt.exists():
            print("writing the bf16 checkpoint (44 GB) ...", flush=True)
            write_checkpoint(ckpt)
        for group in args.groups:
            spec = "int4" if group == 32 else f"int4-g{group}"
            if f"ernie45 {spec}" not in results:
                print(f"ernie45 {spec} ...", flush=True)
                results[f"ernie45 {spec}"] = child("ernie45", ckpt, args, spec)
                saved.write_text(json.dumps(results))
                print(f"  {results[f'ernie45 {spec}']}", flush=True)
        group = args.groups[-1]
        name = f"ernie45 int4-g{group} file"
        if name not in results:  # a second start: `ernie45 quantize` once, then the model from its file
            out = args.dir / f"int4-g{group}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"ernie45 quantize --bits 4 --group-size {group} ...", flush=True)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ernie45", "quantize", str(ckpt), str(out), "--bits", "4",
                            "--group-size", str(group)], check=True)  # fmt: skip
            took, peak = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
            size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
            print(f"  {took:.0f} s, peak RSS {peak:.1f} GB, {size:.1f} GB written", flush=True)
            results[name] = {"quantize s": took, "quantize peak RSS GB": peak, "file GB": size,
                             **child("ernie45", out, args, "file")}  # fmt: skip
            saved.write_text(json.dumps(results))
            print(f"  {results[name]}", flush=True)
            shutil.rmtree(out)  # (the disk must hold the bf16 checkpoint and the Q8_0 GGUF next)
        if not q8.exists():
            print("llama.cpp's converter: Q8_0 ...", flush=True)
            t = time.perf_counter()
            llamacpp.convert(ckpt, args.dir, "Q8_0")
            print(f"  {time.perf_counter() - t:.0f} s", flush=True)
        if not args.keep_bf16:
            shutil.rmtree(ckpt)
        print("llama.cpp's quantizer: Q8_0 -> Q4_0 ...", flush=True)
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, args.threads, True
        if llama_cpp.llama_model_quantize(str(q8).encode(), str(q4).encode(), params) != 0:
            raise SystemExit("llama.cpp could not quantize to Q4_0")
    if "llama.cpp Q4_0" not in results:
        print("llama.cpp Q4_0 ...", flush=True)
        results["llama.cpp Q4_0"] = child("llama.cpp", q4, args)
        saved.write_text(json.dumps(results))
    bw_small, bw = read_bandwidth()
    print(f"\nCPU: {cpu_name()}; read bandwidth {max(bw, bw_small) / 1e9:.1f} GB/s")
    print(
        f"ERNIE-4.5-21B-A3B shapes (random weights), batch 1, prompt {args.prompt}, {args.new} new tokens, "
        f"{args.threads} threads; ernie45 int4 loaded from the bf16 checkpoint, llama.cpp Q4_0 from its GGUF"
    )
    cols = ("load s", "first token s", "decode tok/s", "peak RSS GB", "RSS GB", "anon RSS GB")
    print(f"{'engine':26}" + "".join(f"{c:>15}" for c in cols))
    for name, r in results.items():
        print(f"{name:26}" + "".join(f"{r.get(c, float('nan')):15.1f}" for c in cols))
    for name, r in results.items():
        if "quantize s" in r:
            print(
                f"{name}: `ernie45 quantize` {r['quantize s']:.0f} s, peak RSS {r['quantize peak RSS GB']:.1f} GB, "
                f"{r['file GB']:.1f} GB written"
            )


if __name__ == "__main__":
    main()
