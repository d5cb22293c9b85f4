"""The jobs on the command line. `ernie45 moderate VIDEO --policy policy.yaml`: a video screened window by window,
frames and sound, one JSON verdict per line as each window is done; progress and how far behind real time on
stderr; a summary at the end. `ernie45 analyze FILE... --ask QUESTION`: documents of any length, map-reduce by
pages, the answer with the pages it came from."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .chat import _open_llm
from .errors import UsageError


def cmd_moderate(args: argparse.Namespace) -> None:
    from ..jobs.moderate import load_policy, moderate, summary

    try:
        policy = load_policy(args.policy)
    except ValueError as e:
        raise UsageError(str(e)) from None
    live = args.video == "-"
    if not live and not Path(args.video).exists():
        raise UsageError(f"{args.video}: no such file (use - to read a stream from stdin, with --format)")
    if live and not args.format:
        raise UsageError("reading a stream from stdin needs its container: --format mpegts (or matroska, flv, ...)")
    llm = _open_llm(args)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (closed below)
    source = sys.stdin.buffer if live else Path(args.video)
    verdicts, began = [], time.perf_counter()
    try:
        for v in moderate(source, policy, llm, length=args.window, stride=args.stride, fps=args.fps,
                          format=args.format):  # fmt: skip
            verdicts.append(v)
            out.write(json.dumps(v, ensure_ascii=False) + "\n")
            out.flush()
            took = time.perf_counter() - began
            flagged = sum(bool(x["labels"]) for x in verdicts)
            print(f"window {len(verdicts)}: {v['start']:.1f}-{v['end']:.1f} s {v['labels'] or 'clean'}; "
                  f"{flagged} flagged so far; {v['end'] / took:.2f}x real time, {v['behind']:.1f} s behind",
                  file=sys.stderr, flush=True)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if args.out:
            out.close()
    print(json.dumps({"summary": summary(verdicts, policy)}, ensure_ascii=False), file=sys.stderr)


def add_commands(sub) -> None:
    m = sub.add_parser("moderate", help="screen a video (frames and sound) against a policy, window by window")
    m.add_argument("video", metavar="VIDEO", help="a video file, a growing file, or - for a stream on stdin")
    m.add_argument(
        "--policy",
        required=True,
        metavar="FILE",
        help="YAML or JSON: {categories: {name: description, ...}, instructions: ...}",
    )
    m.add_argument("--window", type=float, default=4.0, metavar="S", help="window length in seconds (default 4)")
    m.add_argument("--stride", type=float, default=None, metavar="S", help="window step (default: the length)")
    m.add_argument("--fps", type=float, default=2.0, help="frames per second looked at (default 2)")
    m.add_argument("--format", help="the container of a stream on stdin (mpegts, matroska, ...)")
    m.add_argument("--out", metavar="FILE", help="write the JSON Lines verdicts here (default: stdout)")
    m.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded demo model)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    m.set_defaults(func=cmd_moderate)


def cmd_analyze(args: argparse.Namespace) -> None:
    from ..jobs.analyze import analyze

    for f in args.files:
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such file")
    llm = _open_llm(args)
    try:
        result = analyze(args.files, args.ask, llm, note_tokens=args.note_tokens, answer_tokens=args.max_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        notes = [{"pages": p, "note": n} for p, n in result.notes]
        print(json.dumps({"answer": result.answer, "chunks": result.chunks, "notes": notes}, ensure_ascii=False))
        return
    print(result.answer)
    if result.notes:
        print("\nSources: " + "; ".join(p for p, _ in result.notes))


def add_analyze(sub) -> None:
    a = sub.add_parser("analyze", help="ask a question over documents of any length (PDF, CSV, XLSX, text): map-reduce")
    a.add_argument("files", nargs="+", metavar="FILE")
    a.add_argument("--ask", required=True, metavar="QUESTION", help="the question to answer from the files")
    a.add_argument("--max-tokens", type=int, default=256, help="longest final answer (default 256)")
    a.add_argument("--note-tokens", type=int, default=96, help="longest note per chunk of pages (default 96)")
    a.add_argument("--json", action="store_true", help="print the answer and the notes as one JSON object")
    a.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded demo model)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    a.set_defaults(func=cmd_analyze)
