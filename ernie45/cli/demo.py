"""`ernie45 eval-demo`: how well the (embedded) demo model does each skill on fresh held-out samples."""

from __future__ import annotations

import argparse
import sys

from .chat import _open_llm


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from ..demo.eval import CARD_FAMILIES, HELD_OUT, evaluate, report
    from ..demo.induction import copy_score

    llm = _open_llm(args)
    with torch.inference_mode():  # the trunk's skill under every job: 0% for a model that cannot copy at all
        copied = copy_score(llm.model, llm.processor.tokenizer, seed=args.seed)
    print(f"copying from the context (random runs given twice, the second predicted): {copied:.0%}\n")
    later = args.n // 2 if args.later is None else args.later
    ok = True
    for generator in ("train", "heldout") if args.generator == "both" else (args.generator,):
        print(f"{generator} generator ({args.n} first-turn and {later} later-turn questions per task family):")
        families = CARD_FAMILIES if generator == "first" else None  # it draws none of the jobs' media
        table, passed = report(evaluate(llm, n=args.n, seed=HELD_OUT + args.seed, generator=generator, later=later,
                                        families=families))  # fmt: skip
        print(table, end="\n\n", flush=True)
        ok &= passed or generator != "heldout"  # the card's targets are on the held-out generator
    if args.check and not ok:
        sys.exit(1)


def add_commands(sub) -> None:
    e = sub.add_parser("eval-demo", help="accuracy per skill of the demo model on freshly generated samples")
    e.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded demo model)")
    e.add_argument("--n", type=int, default=50, help="samples per task family (default 50)")
    e.add_argument("--seed", type=int, default=0, help="offset of the held-out seeds")
    e.add_argument(
        "--generator",
        choices=["train", "heldout", "both", "first"],
        default="both",
        help="the training generator (new seeds), the held-out one (code it never trained on), both, or the first "
        "generation's (one layout per kind: the shipped model's card)",
    )
    e.add_argument(
        "--later",
        type=int,
        default=None,
        metavar="N",
        help="questions per family asked as turn 2-4 of a conversation (default n/2)",
    )
    e.add_argument("--check", action="store_true", help="exit 1 when a held-out skill is below its target")
    e.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_eval)
