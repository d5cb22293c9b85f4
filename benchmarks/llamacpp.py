"""The llama.cpp rows of the speed benchmarks: the same checkpoint converted to GGUF, timed through llama-cpp-python.

Needs `bash benchmarks/setup_llamacpp.sh` first (llama-cpp-python built for this CPU, and the converter its
source ships). Conversion: `convert_hf_to_gguf.py --outtype bf16 | q8_0`; Q4_0 by llama.cpp's own quantizer
from the BF16 file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONVERTER = HERE / ".llamacpp" / "llama.cpp" / "convert_hf_to_gguf.py"
FORMATS = ("BF16", "Q8_0", "Q4_0")


def available() -> str | None:
    """None when llama.cpp can be benchmarked, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (run benchmarks/setup_llamacpp.sh)"
    if not CONVERTER.is_file():
        return f"{CONVERTER} is missing (run benchmarks/setup_llamacpp.sh)"
    return None


def convert(hf_dir: Path, out: Path, fmt: str) -> Path:
    """`hf_dir` (official layout, with a sentencepiece tokenizer.model) -> a GGUF file in `fmt`."""
    target = out / f"model-{fmt}.gguf"
    if target.exists():
        return target
    if fmt == "Q4_0":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        src = convert(hf_dir, out, "BF16")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(target).encode(), params) != 0:
            raise RuntimeError("llama.cpp could not quantize to Q4_0")
        return target
    cmd = [sys.executable, str(CONVERTER), str(hf_dir), "--outtype", fmt.lower(), "--outfile", str(target)]
    subprocess.run(cmd, check=True, capture_output=True)
    return target


def bench(gguf: Path, batch: int, prompt: int, new: int, threads: int) -> tuple[float, float, str]:
    """(prefill tok/s, decode tok/s, note): `_bench` in a child process, again without the extra buffers if the
    first one dies (note says which ran)."""
    for extra in (True, False):
        cmd = [sys.executable, __file__, str(gguf), str(batch), str(prompt), str(new), str(threads), str(int(extra))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            pre, dec = json.loads(r.stdout.strip().splitlines()[-1])
            return pre, dec, "" if extra else "extra buffers off (they crash)"
        if r.returncode > 0:
            raise RuntimeError(f"llama.cpp benchmark failed: {r.stderr[-2000:]}")
    raise RuntimeError(f"llama.cpp crashed with and without its extra buffers (signal {-r.returncode})")


def _bench(gguf: Path, batch: int, prompt: int, new: int, threads: int, extra_bufts: bool) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of the GGUF opened as `open_model` opens it (`timed` says how)."""
    return timed(open_model(gguf, prompt, new, threads, extra_bufts), batch, prompt, new)


def open_model(gguf: Path, prompt: int, new: int, threads: int, extra_bufts: bool = True):
    """The GGUF as a llama-cpp-python `Llama` with room for `prompt + new` tokens, with or without llama.cpp's
    extra (repacked) weight buffers."""
    import llama_cpp
    import llama_cpp.llama

    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params  # the high-level API does not expose it
    return llama_cpp.Llama(str(gguf), n_ctx=prompt + new + 8, n_batch=min(prompt, 2048),
                           n_ubatch=min(prompt, 512), n_threads=threads, n_threads_batch=threads,
                           verbose=False)  # fmt: skip


def timed(llm, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): the prompt evaluated in one batch, then `new - 1` single-token steps.

    llama-cpp-python's high-level API runs one sequence, so batch > 1 is `batch` sequences one after another
    (what a user of that API gets).
    """
    import numpy as np

    ids = list(range(100, 100 + prompt))
    pre = dec = 0.0
    llm.eval(ids[:8])  # warm-up
    for _ in range(batch):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pre += time.perf_counter() - t
        token = 100
        t = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())  # greedy
        dec += time.perf_counter() - t
    return batch * prompt / pre, batch * (new - 1) / dec


if __name__ == "__main__":
    g, b, p, n, t, x = sys.argv[1:7]
    print(json.dumps(_bench(Path(g), int(b), int(p), int(n), int(t), bool(int(x)))))
