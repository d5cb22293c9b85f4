"""Served decode against in-process decode, side by side: the 0.3B shapes through `ernie45 serve` and the
`openai` SDK (1 and 8 concurrent streams) and through `LLM.generate` (batch 1 and 8), in one run.

    python benchmarks/serve.py                # 0.3B shapes, bf16, prompt ~256 tokens, 64 new tokens
    python benchmarks/serve.py --new 128 --streams 1,4,8

Decode tok/s = tokens after each request's first / the time from the first first-token to the last token
(in process: batch x (new - 1) / (time for new tokens - time to the first token), as `decode.py`). The server
runs as its own process on localhost; the two sides never run at the same time. Random weights, greedy.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from decode import make_checkpoint, timed
from machine import cpu_name

from ernie45.engine import LLM, SamplingParams
from ernie45.runtime import hugepages

PROMPT = "the quick brown fox jumps over the lazy dog and keeps running through the field " * 16


def in_process(path: Path, batch: int, new: int) -> float:
    llm = LLM(path, dtype=torch.bfloat16)
    hugepages.wait()
    print(f"    runtime: {llm.report.summary()}", flush=True)
    prompts = [f"{i} {PROMPT}" for i in range(batch)]

    def run(n: int):
        return lambda: llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    first = timed(run(1))
    whole = timed(run(new), repeat=1)
    return batch * (new - 1) / (whole - first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(path: Path, streams_list: list[int], new: int) -> dict[int, float]:
    from openai import OpenAI

    port = _free_port()
    cmd = [sys.executable, "-m", "ernie45", "serve", str(path), "--port", str(port), "--dtype", "bfloat16",
           "--max-batch", str(max(streams_list))]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 10 minutes")
            time.sleep(0.5)
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        model = client.models.list().data[0].id
        out = {}
        for streams in streams_list:
            stream_once(client, model, streams, 4)  # warm-up: the slot cache, the kernels' plans
            out[streams] = stream_once(client, model, streams, new)
        return out
    finally:
        server.terminate()
        server.wait(timeout=60)


def stream_once(client, model: str, streams: int, new: int) -> float:
    """Decode tok/s of `streams` concurrent streaming requests: (tokens - 1 per request) / (wall time for `new`
    tokens - wall time for 1), as the in-process figure is measured (random weights often decode to ids the
    small test tokenizer prints as nothing, so chunk arrival times would not count tokens)."""

    def wall(n: int) -> tuple[float, list[int]]:
        counts = [0] * streams

        def one(i: int) -> None:
            chunks = client.completions.create(model=model, prompt=f"{i} {PROMPT}", max_tokens=n, temperature=0,
                                               stream=True, stream_options={"include_usage": True})  # fmt: skip
            for chunk in chunks:
                if chunk.usage is not None:
                    counts[i] = chunk.usage.completion_tokens

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t, counts

    first = min(wall(1)[0] for _ in range(2))
    whole, counts = wall(new)
    return sum(c - 1 for c in counts) / (whole - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--streams", default="1,8", help="comma list of concurrent streams / batch sizes")
    args = p.parse_args()
    sizes = [int(s) for s in args.streams.split(",")]
    torch.set_num_threads(os.cpu_count() or 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint("0.3b", Path(tmp) / "ckpt")
        local = {b: in_process(path, b, args.new) for b in sizes}
        remote = served(path, sizes, args.new)
    print(f"\n0.3b shapes, bf16, greedy, {args.new} new tokens; CPU: {cpu_name()}")
    print(f"{'streams / batch':<16} {'LLM.generate tok/s':>19} {'served tok/s':>13} {'served / in-process':>20}")
    for b in sizes:
        print(f"{b:<16} {local[b]:>19.1f} {remote[b]:>13.1f} {remote[b] / local[b]:>19.2f}x")


if __name__ == "__main__":
    main()
