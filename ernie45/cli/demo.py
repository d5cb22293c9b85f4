"""`ernie45 eval-demo`: how well the (embedded) demo model does each skill on fresh held-out samples."""

from __future__ import annotations

import argparse
import sys

from .chat import _open_llm


def cmd_eval(args: argparse.Namespace) -> None:
    from ..demo.eval import HELD_OUT, evaluate, report

    llm = _open_llm(args)
    table, ok = report(evaluate(llm, n=args.n, seed=HELD_OUT + args.seed))
    print(table)
    if args.check and not ok:
        sys.exit(1)


def add_commands(sub) -> None:
    e = sub.add_parser("eval-demo", help="accuracy per skill of the demo model on freshly generated samples")
    e.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded demo model)")
    e.add_argument("--n", type=int, default=50, help="samples per task family (default 50)")
    e.add_argument("--seed", type=int, default=0, help="offset of the held-out seeds")
    e.add_argument("--check", action="store_true", help="exit 1 when a skill is below its target")
    e.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_eval)
