"""Where a request's media may come from: `data:` URLs always; local files only under the allowed
directory (no way out by `..` or links); remote URLs only when the server was started to fetch them."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .protocol import APIError

KINDS = {"image_url": ("image", "image_url"), "video_url": ("video", "video_url"), "input_audio": ("audio", None)}


class MediaPolicy:
    def __init__(self, allowed_dir: str | Path | None = None, allow_remote: bool = False,
                 max_remote_bytes: int = 32 << 20, timeout: float = 10.0) -> None:  # fmt: skip
        self.allowed_dir = Path(allowed_dir).resolve() if allowed_dir else None
        self.allow_remote, self.max_remote_bytes, self.timeout = allow_remote, max_remote_bytes, timeout

    def resolve(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """OpenAI parts -> the processor's parts (image / video / audio with bytes, a path or a data: URL)."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                m = {**m, "content": [self._part(p) for p in content]}
            out.append(m)
        return out

    def _part(self, part: dict[str, Any]) -> dict[str, Any]:
        kind = part["type"]
        if kind == "text":
            return part
        native, field = KINDS[kind]
        if kind == "input_audio":
            a = part["input_audio"]
            return {"type": "audio", "audio": f"data:audio/{a.get('format', 'wav')};base64,{a['data']}"}
        return {"type": native, native: self._source(part[field]["url"], kind)}

    def _source(self, url: str, param: str) -> str | bytes | Path:
        if url.startswith("data:"):
            return url
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote URLs are off on this server (start it with "
                                    "--allow-remote-media), send the media as a data: URL", param=param)  # fmt: skip
            return self._fetch(url, param)
        if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
            raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}; use data:, a local path or http(s)",
                           param=param)  # fmt: skip
        return self._local(unquote(urlparse(url).path) if scheme == "file" else url, param)

    def _local(self, path: str, param: str) -> Path:
        if self.allowed_dir is None:
            raise APIError(400, f"{param}: local files are off on this server (start it with "
                                "--allowed-media-dir DIR), send the media as a data: URL", param=param)  # fmt: skip
        p = (self.allowed_dir / path).resolve()
        if not p.is_relative_to(self.allowed_dir):
            raise APIError(400, f"{param}: {path!r} is outside the allowed media directory", param=param)
        if not p.is_file():
            raise APIError(400, f"{param}: no such file {path!r} in the allowed media directory", param=param)
        return p

    def _fetch(self, url: str, param: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:  # noqa: S310 (http(s) only, checked)
                data = r.read(self.max_remote_bytes + 1)
        except OSError as e:
            raise APIError(400, f"{param}: could not fetch {url}: {e}", param=param) from None
        if len(data) > self.max_remote_bytes:
            raise APIError(413, f"{param}: {url} is larger than {self.max_remote_bytes} bytes", param=param)
        return data
