"""The `ernie45` command line. User mistakes end in one line that says what to do, never a traceback."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..demo import MissingDataSource
from ..processing.tokenizer import TokenizerError
from . import chat, demo, inspect, jobs, serve, train
from .errors import UsageError

USER_ERRORS = (UsageError, ConfigError, CheckpointError, TokenizerError, MissingDataSource)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="ernie45", description="ERNIE 4.5 family: chat, generate, inspect, convert.")
    p.add_argument("--version", action="version", version=f"ernie45 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat.add_commands(sub)
    inspect.add_commands(sub)
    demo.add_commands(sub)
    train.add_commands(sub)
    serve.add_commands(sub)
    jobs.add_commands(sub)
    jobs.add_analyze(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        first, _, rest = str(e).partition("\n")
        print(f"ernie45 {args.command}: error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0
