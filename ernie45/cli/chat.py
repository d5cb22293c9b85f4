"""`ernie45 generate` and `ernie45 chat`: one answer, or an interactive multi-turn conversation.

In chat, answers stream as they are produced; ``/image PATH``, ``/video PATH`` and ``/audio PATH`` attach
media to the next message, ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) leaves. Ctrl-C stops the
current answer and returns to the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UsageError

HELP = "commands: /image PATH, /video PATH, /audio PATH, /file PATH (attach to your next message), /reset, /help, /exit"
HELP_LONG = """\
  /image PATH   attach a picture to your next message (repeatable)
  /video PATH   attach a video to your next message
  /audio PATH   attach a sound file (wav, mp3, ...) to your next message
  /file PATH    attach a document (PDF, CSV, XLSX, text) to your next message
  /reset        forget the conversation and any attachments
  /help         this list
  /exit         leave (Ctrl-D works too)
  Ctrl-C        stop the answer being written"""


def _open_llm(args: argparse.Namespace):
    from ..engine import LLM

    if args.model is None:
        from ..demo import default_model_path

        try:
            args.model = str(default_model_path())
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    from ..hub import NotFound, resolve

    try:
        path = resolve(args.model)
    except NotFound as e:
        raise UsageError(str(e)) from None
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a checkpoint directory (it needs config.json, weights and a tokenizer)")
    quantization, compile = getattr(args, "quantization", None), getattr(args, "compile", None)
    spec = getattr(args, "speculative", None)  # a speculative_config, parsed by `_speculative`
    extra = {"speculative_config": spec} if spec else {}
    try:
        return LLM(path, dtype=args.dtype, quantization=quantization, compile=compile, **extra)
    except ValueError as e:  # a bad option value, named
        raise UsageError(str(e)) from None


def _sampling(args: argparse.Namespace, llm):
    from dataclasses import replace

    overrides = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.stop:
        overrides["stop"] = list(args.stop)
    try:
        return replace(llm.default_sampling, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _user_message(text: str, media: dict[str, list[str]], video_audio: bool = False) -> dict:
    """An OpenAI-shaped user message: the attached media first, then the text."""
    parts = [{"type": kind, kind: path} for kind in ("image", "video", "audio", "file") for path in media.get(kind, [])]
    if video_audio:
        for p in parts:
            if p["type"] == "video":
                p["use_audio"] = True
    return (
        {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
        if parts
        else {"role": "user", "content": text}
    )


def cmd_generate(args: argparse.Namespace) -> None:
    _tools(args)  # a bad --tools file is said before the model loads
    llm = _open_llm(args)
    params = _sampling(args, llm)
    media = {"image": args.image, "video": args.video, "audio": args.audio, "file": args.file}
    for f in [*args.image, *args.video, *args.audio, *args.file]:
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such file")
    message = _user_message(args.prompt, media, args.video_audio)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [message]
    tools = _tools(args)
    try:
        if args.raw:
            if any(media.values()) or args.system or tools:
                raise UsageError("--raw takes the prompt text only (no media, --system or --tools); drop --raw to "
                                 "use them")  # fmt: skip
            result = llm.generate(args.prompt, params)[0]
        elif args.json or tools:
            result = llm.chat(messages, params, tools=tools, tool_choice=args.tool_choice)[0]
        else:
            for delta in llm.stream(messages, params):
                print(delta.text, end="", flush=True)
            print()
            return
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "reasoning": result.reasoning,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "tool_calls": result.tool_calls,
                },
                ensure_ascii=False,
            )
        )
    else:
        if result.text:
            print(result.text)
        for call in result.tool_calls or []:
            print(f"tool call: {call['function']['name']}({call['function']['arguments']})")


def _tools(args: argparse.Namespace) -> list[dict] | None:
    """--tools FILE: a JSON list of OpenAI function tools (or {"tools": [...]})."""
    if not getattr(args, "tools", None):
        if getattr(args, "tool_choice", None) not in (None, "auto"):
            raise UsageError("--tool-choice needs --tools FILE")
        return None
    try:
        data = json.loads(Path(args.tools).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--tools {args.tools}: not a readable JSON file ({e})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list):
        raise UsageError(f"--tools {args.tools}: expected a JSON list of tools")
    if isinstance(args.tool_choice, str) and args.tool_choice not in ("auto", "none", "required"):  # a name
        args.tool_choice = {"type": "function", "function": {"name": args.tool_choice}}
    return tools


def cmd_chat(args: argparse.Namespace) -> None:
    tools = _tools(args)
    llm = _open_llm(args)
    params = _sampling(args, llm)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    media: dict[str, list[str]] = {"image": [], "video": [], "audio": [], "file": []}
    print(f"ernie45 chat: {args.model} ({HELP}; Ctrl-C stops an answer)")
    print(f"(runtime: {llm.report.summary()})", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line in ("/help", "/?"):
            print(HELP_LONG)
            continue
        if line == "/reset":
            history = history[:1] if args.system else []
            media = {k: [] for k in media}
            print("(conversation cleared)")
            continue
        if line.startswith(("/image ", "/video ", "/audio ", "/file ")):
            kind, _, path = line.partition(" ")
            path = path.strip()
            if not Path(path).is_file():
                print(f"(no such file: {path})")
                continue
            media[kind[1:]].append(path)
            print(f"(attached {path}; it goes with your next message)")
            continue
        if line.startswith("/"):
            print(f"(unknown command; {HELP})")
            continue
        message = _user_message(line, media)
        if tools:
            history = _tool_turns(llm, params, tools, args.tool_choice, [*history, message])
            media = {k: [] for k in media}
            continue
        answer = ""
        print("ernie> ", end="", flush=True)
        try:
            for delta in llm.stream([*history, message], params):
                answer += delta.text
                print(delta.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print(" [stopped]")
        except ValueError as e:  # unreadable media and the like: say so, keep the conversation
            print(f"\n(error: {e})")
            media = {k: [] for k in media}
            continue
        history += [message, {"role": "assistant", "content": answer}]
        media = {k: [] for k in media}


def _tool_turns(llm, params, tools: list[dict], choice, history: list[dict]) -> list[dict]:
    """Answer with tools: each call is shown and its result asked for (you play the tool), then the model goes on
    until it answers in text. Returns the conversation so far."""
    for _ in range(8):  # a model that only ever calls tools stops here
        try:
            result = llm.chat(history, params, tools=tools, tool_choice=choice)[0]
        except ValueError as e:
            print(f"(error: {e})")
            return history[:-1]
        if result.text:
            print(f"ernie> {result.text}")
        history = [*history, {"role": "assistant", "content": result.text or None, "tool_calls": result.tool_calls}]
        if not result.tool_calls:
            return history
        for call in result.tool_calls:
            fn = call["function"]
            try:
                output = input(f"tool call {fn['name']}({fn['arguments']}) — result> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return history
            history.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        choice = "auto"  # after the results: the model may answer in text
    return history


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's, else 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's, else 1.0)")
    p.add_argument(
        "--top-k", type=int, help="sample among the k likeliest tokens (default: the checkpoint's, else off)"
    )
    p.add_argument("--repetition-penalty", type=float,
                   help="> 1 discourages repeating tokens (default: the checkpoint's, else 1.0)")  # fmt: skip
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before this text (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--tools", metavar="FILE", help="a JSON list of OpenAI function tools the model may call")
    p.add_argument(
        "--tool-choice",
        default=None,
        metavar="CHOICE",
        help="auto (default), none, required, or a function's name (the last two are enforced)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    p.add_argument("--quantization", choices=["int8", "int4", "int4-g64", "int4-g128"],
                   help="weight-only quantization on the fly (default: none)")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through torch.compile (default: on for CUDA only; the first answer waits)")  # fmt: skip
    speculative_option(p)


def speculative_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=_speculative, default=None, metavar="K|mtp[:K]",
                   help="draft K tokens a step by prompt lookup, or by the model's MTP layer ('mtp': one, 'mtp:3': "
                        "three, the layer chained on its own output), and verify them at once (greedy answers "
                        "unchanged); 0 or left out: off")  # fmt: skip


def _speculative(value: str) -> dict | None:
    """ "K" -> n-gram drafts (0: off), "mtp" / "mtp:K" -> MTP drafts: the `speculative_config`, its ranges checked
    by `SpeculativeConfig.parse` here, so that a bad value is refused before the model loads."""
    from ..engine.speculative import SpeculativeConfig

    method, _, k = value.partition(":")
    try:
        if method != "mtp":
            spec = {"method": "ngram", "num_speculative_tokens": int(value)} if int(value) else None
        else:  # (mtp:0 is refused below, by the range check every speculative_config goes through)
            spec = {"method": "mtp", "num_speculative_tokens": int(k or 1)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: a number of drafted tokens (e.g. 4), 'mtp' or 'mtp:K' (e.g. mtp:3)"
        ) from None
    try:
        SpeculativeConfig.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
    return spec


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="answer one prompt (with optional images, videos, audio)")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--image", action="append", default=[], metavar="FILE", help="attach an image (repeatable)")
    g.add_argument("--video", action="append", default=[], metavar="FILE", help="attach a video (repeatable)")
    g.add_argument("--audio", action="append", default=[], metavar="FILE", help="attach audio (repeatable)")
    g.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="FILE",
        help="attach a document: PDF (its pages' text, and pictures of pages with charts), CSV, XLSX, text",
    )
    g.add_argument("--video-audio", action="store_true", help="let the model hear the videos' sound tracks too")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--system", help="a system prompt")
    _common(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="talk with a model in the terminal")
    c.add_argument("--system", help="a system prompt")
    _common(c)
    c.set_defaults(func=cmd_chat)
