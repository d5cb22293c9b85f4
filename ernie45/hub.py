"""Hub ids (`baidu/ERNIE-4.5-0.3B-PT`) resolved from the local Hugging Face cache; nothing is downloaded.

ernie45 never reaches the network at run time. A checkpoint that `hf download` (or transformers) already put
in the cache is found there by its id; one that is not gets an error that says how to fetch it.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NotFound(FileNotFoundError):
    """A name that is neither a directory nor a hub id in the local cache (the message says what to do)."""


def resolve(name: str | Path) -> Path:
    """The directory `name` names: itself if it is one, else the cached snapshot of hub id `name`."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if not HUB_ID.match(text) or path.exists():
        raise NotFound(f"{text} is not a checkpoint directory: not a directory here")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # not cached (or the hub library cannot say): the user is told how to get it
        from huggingface_hub.constants import HF_HUB_CACHE

        raise NotFound(
            f"{text} is not a local directory and not in the Hugging Face cache ({HF_HUB_CACHE}). ernie45 does "
            f"not download at run time: fetch it once with `hf download {text}` (pip install huggingface_hub) "
            f"and run again, or pass the checkpoint's directory"
        ) from None
