"""Soak: `ernie45 serve` (the embedded demo model) under mixed normal and hostile traffic from concurrent clients,
its RSS sampled throughout. After warm-up the RSS should stay flat and every normal request be answered.

    python benchmarks/soak.py                    # 30 minutes, 8 clients
    python benchmarks/soak.py --minutes 3        # a short run

Hostile kinds: a text far over the context, an image whose header claims 64 Mpx, a NUL in a media path, a seed
beyond int64, an n=8 stream dropped after its first chunk, a connection that never finishes its headers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
from machine import cpu_name
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(size=(64, 48), claim: tuple[int, int] | None = None) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (random.randrange(256), 90, 40)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    if claim:  # rewrite the header's size: a decompression bomb's shape without its bytes
        at = data.index(b"IHDR")
        data[at + 4 : at + 12] = struct.pack(">II", *claim)
        data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def _chat(content, **kw) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 16, **kw}


def _image(url: str) -> list[dict]:
    return [{"type": "text", "text": "what colour is it?"}, {"type": "image_url", "image_url": {"url": url}}]


def normal(c: httpx.Client) -> tuple[str, int]:
    if random.random() < 0.5:
        return "normal text", c.post("/v1/chat/completions", json=_chat("say hello")).status_code
    return "normal image", c.post("/v1/chat/completions", json=_chat(_image(_png()))).status_code


def hostile(c: httpx.Client, port: int) -> tuple[str, int]:
    kind = random.choice(["long text", "image bomb", "nul path", "huge seed", "dropped stream", "slow headers"])
    if kind == "long text":
        return kind, c.post("/v1/chat/completions", json=_chat("lorem ipsum " * 400_000)).status_code
    if kind == "image bomb":
        return kind, c.post("/v1/chat/completions", json=_chat(_image(_png((1, 1), (7999, 7999))))).status_code
    if kind == "nul path":
        return kind, c.post("/v1/chat/completions", json=_chat(_image("a\x00b.png"))).status_code
    if kind == "huge seed":
        return kind, c.post("/v1/chat/completions", json=_chat("hi", seed=2**70)).status_code
    if kind == "dropped stream":
        with c.stream("POST", "/v1/chat/completions", json=_chat("tell a story", n=8, stream=True,
                                                                 max_tokens=200)) as r:  # fmt: skip
            next(r.iter_lines(), None)
            return kind, r.status_code
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        s.settimeout(30)
        closed = s.recv(10) == b""
    return kind, 408 if closed else 0


def rss(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) >> 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--hostile", type=float, default=0.3, help="share of requests that are hostile")
    args = p.parse_args()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "ernie45", "serve", "--port", str(port),
                               "--served-model-name", "demo", "--header-timeout", "3"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            sys.exit("the server did not start: " + (server.stderr.read() if server.poll() is not None else ""))
        time.sleep(0.5)
    results: Counter = Counter()
    failures: list[str] = []
    stop = time.time() + args.minutes * 60
    lock = threading.Lock()

    def client(seed: int) -> None:
        random.seed(seed)
        with httpx.Client(base_url=base, timeout=120) as c:
            while time.time() < stop:
                try:
                    kind, status = hostile(c, port) if random.random() < args.hostile else normal(c)
                except httpx.HTTPError as e:
                    kind, status = "transport error", 0
                    failures.append(f"{type(e).__name__}: {e}")
                with lock:
                    results[(kind, status)] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    start = time.time()
    while any(t.is_alive() for t in threads):
        samples.append((time.time() - start, rss(server.pid)))
        time.sleep(2)
    server.terminate()
    server.wait(timeout=30)
    warm = [m for t, m in samples if t >= min(60, args.minutes * 15)]  # after the first minute (or quarter)
    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, {args.hostile:.0%} hostile; CPU {cpu_name()}")
    peak = max(m for _, m in samples)
    print(
        f"server RSS MiB: start {samples[0][1]}, after warm-up {warm[0] if warm else '-'}, peak {peak}, "
        f"end {samples[-1][1]}"
    )
    print(f"{'request':<16} {'status':>6} {'count':>7}")
    for (kind, status), n in sorted(results.items()):
        print(f"{kind:<16} {status:>6} {n:>7}")
    normal_bad = sum(n for (k, s), n in results.items() if k.startswith("normal") and s != 200)
    print(f"normal requests not answered with 200: {normal_bad}; transport errors: {len(failures)}")
    print(json.dumps({"rss_mib": [m for _, m in samples[:: max(1, len(samples) // 30)]]}))


if __name__ == "__main__":
    main()
