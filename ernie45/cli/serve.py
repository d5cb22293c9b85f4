"""`ernie45 serve`: the OpenAI-compatible server and web chat page."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .chat import _open_llm, speculative_option
from .errors import UsageError


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from ..serve import MediaPolicy, create_app
        from ..serve.http import server as http_server
    except ImportError as e:
        raise UsageError(f"serving needs the server extras: pip install 'ernie45[serve]' ({e})") from None
    if args.allowed_media_dir and not Path(args.allowed_media_dir).is_dir():
        raise UsageError(f"--allowed-media-dir {args.allowed_media_dir}: no such directory")
    if args.model_dir is not None:
        if args.model is not None and args.model != args.model_dir:
            raise UsageError(f"two models given: {args.model_dir} and --model {args.model}; give one")
        args.model = args.model_dir
    llm = _open_llm(args)
    name = args.served_model_name or Path(llm.model.config.name_or_path or "ernie45").name
    app = create_app(
        llm, name=name, api_key=args.api_key or os.environ.get("ERNIE45_API_KEY"),
        media=MediaPolicy(args.allowed_media_dir, args.allow_remote_media,
                          allow_private=args.allow_private_media_hosts), max_batch=args.max_batch,
        max_len=args.max_model_len, max_waiting=args.max_waiting, max_body_bytes=args.max_body_mb << 20,
        engine_thread=False, max_slots_per_request=args.max_slots_per_request, max_image_pixels=args.max_image_pixels,
        max_video_frames=args.max_video_frames,
    )  # fmt: skip
    print(f"ernie45: serving {name!r} on http://{args.host}:{args.port}/  (OpenAI API under /v1)", flush=True)
    print(f"ernie45: runtime: {llm.report.summary()}", file=sys.stderr, flush=True)
    # the engine steps on this thread, which loaded the model (one OpenMP pool: see BatchEngine); HTTP on another
    server = http_server(app, host=args.host, port=args.port, log_level=args.log_level,
                         header_timeout=args.header_timeout, keep_alive=args.keep_alive,
                         max_connections=args.max_connections)  # fmt: skip
    http = threading.Thread(target=server.run, name="ernie45-http", daemon=True)
    http.start()
    engine = app.state.engine
    stopper = threading.Thread(target=_stop_with, args=(http, engine), daemon=True)
    stopper.start()
    signal.signal(signal.SIGTERM, _interrupt)  # stop as Ctrl-C does: the engine's loop ends, then HTTP
    try:
        engine.run()
    finally:
        server.should_exit = True
        http.join(timeout=10)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_with(http: threading.Thread, engine) -> None:
    """The HTTP server ending (a bind error, a shutdown) ends the engine's loop too."""
    http.join()
    engine.shutdown()


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible API server with a web chat page")
    s.add_argument("model_dir", nargs="?", metavar="DIR", help="checkpoint directory or cached hub id (as `vllm "
                   "serve DIR`; default: the embedded demo model)")  # fmt: skip
    s.add_argument("--model", metavar="DIR", help="the same, as an option")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set ERNIE45_API_KEY)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    s.add_argument("--allowed-media-dir", metavar="DIR", help="let requests name local files under DIR")
    s.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="let the server fetch http(s) media URLs (public addresses only)",
    )
    s.add_argument(
        "--allow-private-media-hosts",
        action="store_true",
        help="with --allow-remote-media, also fetch from loopback and private addresses",
    )
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    s.add_argument("--max-model-len", type=int, default=4096, help="tokens per request, prompt + answer")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default 256)")
    s.add_argument("--max-body-mb", type=int, default=64, help="largest request body in MiB (default 64)")
    s.add_argument(
        "--max-slots-per-request",
        type=int,
        default=None,
        metavar="N",
        help="slots one request (its prompts x n) holds at a time (default: half of --max-batch)",
    )
    s.add_argument(
        "--max-image-pixels",
        type=int,
        default=16_000_000,
        metavar="N",
        help="larger images (and video frames) are refused from their header (default 16,000,000)",
    )
    s.add_argument(
        "--max-video-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames sampled from a video at most (default: the model's setting; a video is also "
        "fitted to --max-model-len by fewer, smaller frames)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="close a connection whose request headers take longer (default 10 s)",
    )
    s.add_argument(
        "--keep-alive",
        type=int,
        default=5,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default 5)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=512,
        metavar="N",
        help="open connections / running requests before new requests get 503 (default 512)",
    )
    s.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    speculative_option(s)
    s.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
