"""The jobs' speed on this machine: document ingestion (pages per second, PDF pages with text and charts, read and
rendered as `--file` does) and video moderation's real-time factor (media seconds per wall second) on the embedded
demo model.

    python benchmarks/jobs.py                 # 200 pages; a 20 s clip in 4 s windows
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from doc_fixtures import make_pdf  # noqa: E402
from machine import cpu_name  # noqa: E402
from test_moderate import _clip  # noqa: E402

from ernie45.engine import LLM  # noqa: E402
from ernie45.jobs.moderate import Policy, moderate  # noqa: E402
from ernie45.processing.documents import DocumentOptions, pdf_pages  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--window", type=float, default=4.0)
    args = p.parse_args()
    llm = LLM()
    pdf = make_pdf([{"text": [f"Section {i}: the northern depot shipped {i * 7} orders this week, on time."]}
                    if i % 4 else {"chart": [20, 30 + i % 20, 40], "text": [f"Figure {i}"]}
                    for i in range(args.pages)])  # fmt: skip
    rows = []
    for label, target in (("demo budget", llm.processor.image.max_pixels), ("1 Mpx renderings", 1_000_000)):
        started = time.perf_counter()
        tokens = 0
        for _, parts in pdf_pages(pdf, "bench.pdf", DocumentOptions(target_pixels=target, max_pages=10_000)):
            for part in parts:
                if part["type"] == "text":
                    tokens += len(llm.processor.tokenizer.encode(part["text"], add_special_tokens=False))
        took = time.perf_counter() - started
        rows.append((f"PDF ingestion, {label}", f"{args.pages / took:.1f} pages/s", f"{tokens} text tokens"))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        clip.write_bytes(_clip(seconds=args.seconds))
        policy = Policy({"red_screen": "the picture is red", "alarm_tone": "a tone is heard"})
        started = time.perf_counter()
        verdicts = list(moderate(clip, policy, llm, length=args.window))
        took = time.perf_counter() - started
    rows.append((f"moderation, {args.window:g} s windows", f"{args.seconds / took:.2f}x real time",
                 f"{len(verdicts)} windows, {took / len(verdicts):.1f} s each"))  # fmt: skip
    print(f"\nembedded demo model; CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    for name, value, note in rows:
        print(f"{name:<34} {value:>18}   {note}")


if __name__ == "__main__":
    main()
