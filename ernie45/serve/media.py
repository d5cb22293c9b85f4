"""Where a request's media may come from: `data:` URLs always; local files only under the allowed
directory (no way out by `..` or links); remote URLs only when the server was started to fetch them.

A remote fetch runs on the event loop without blocking it, with one deadline for the whole fetch, a size cap,
http(s) only (a redirect is followed only to http(s), re-checked, at most 3 times), and no loopback, private,
link-local or other non-public address unless the server allows them (`allow_private`)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

import httpx

from ..processing.media import Fit
from .protocol import APIError

KINDS = {"image_url": ("image", "image_url"), "video_url": ("video", "video_url"), "input_audio": ("audio", None)}


LOW_DETAIL_SIDE = 512  # OpenAI's `detail: "low"`: the picture fitted into 512 x 512 first, so it costs fewer tokens


class MediaPolicy:
    def __init__(self, allowed_dir: str | Path | None = None, allow_remote: bool = False,
                 max_remote_bytes: int = 32 << 20, timeout: float = 10.0,
                 allow_private: bool = False) -> None:  # fmt: skip
        """timeout: seconds for a whole remote fetch (connect, redirects, body)."""
        self.allowed_dir = Path(allowed_dir).resolve() if allowed_dir else None
        self.allow_remote, self.max_remote_bytes, self.timeout = allow_remote, max_remote_bytes, timeout
        self.allow_private = allow_private

    async def resolve(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """OpenAI parts -> the processor's parts (image / video / audio with bytes, a path or a data: URL)."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                m = {**m, "content": [await self._part(p) for p in content]}
            out.append(m)
        return out

    async def _part(self, part: dict[str, Any]) -> dict[str, Any]:
        kind = part["type"]
        if kind == "text":
            return part
        if kind == "file":  # a document's bytes, read by the processor (`processing.documents`)
            f = part["file"]
            if not f.get("file_data"):
                raise APIError(400, "file: send the file's bytes as file_data (a data: URL); this server keeps no "
                                    "uploaded files, so file_id cannot be used", param="file")  # fmt: skip
            return {"type": "file", "file": {"file_data": f["file_data"], "filename": f.get("filename")}}
        native, field = KINDS[kind]
        if kind == "input_audio":
            a = part["input_audio"]
            return {"type": "audio", "audio": f"data:audio/{a.get('format', 'wav')};base64,{a['data']}"}
        url = part[field]["url"]
        sound = {"use_audio": True} if kind == "video_url" and part[field].get("use_audio") else {}
        if urlparse(url).scheme.lower() in ("http", "https") and self.allow_remote:
            source = await self._fetch(url, kind)
        else:
            source = self._source(url, kind)
        if kind == "image_url" and part[field].get("detail") == "low":
            source = Fit(source, LOW_DETAIL_SIDE)  # scaled where the processor decodes it (the media pool)
        return {"type": native, native: source, **sound}

    def _source(self, url: str, param: str) -> str | bytes | Path:
        if url.startswith("data:"):
            return url
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote URLs are off on this server (start it with "
                                    "--allow-remote-media), send the media as a data: URL", param=param)  # fmt: skip
            raise AssertionError("remote URLs are fetched by _part")
        if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
            raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}; use data:, a local path or http(s)",
                           param=param)  # fmt: skip
        return self._local(unquote(urlparse(url).path) if scheme == "file" else url, param)

    def public(self, message: str) -> str:
        """`message` without the server's own directory (a client knows its files by their relative names)."""
        return message if self.allowed_dir is None else message.replace(f"{self.allowed_dir}/", "")

    def _local(self, path: str, param: str) -> Path:
        if "\x00" in path:
            raise APIError(400, f"{param}: a file name cannot contain a NUL character", param=param)
        if self.allowed_dir is None:
            raise APIError(400, f"{param}: local files are off on this server (start it with "
                                "--allowed-media-dir DIR), send the media as a data: URL", param=param)  # fmt: skip
        p = (self.allowed_dir / path).resolve()
        if not p.is_relative_to(self.allowed_dir):
            raise APIError(400, f"{param}: {path!r} is outside the allowed media directory", param=param)
        if not p.is_file():
            raise APIError(400, f"{param}: no such file {path!r} in the allowed media directory", param=param)
        return p

    async def _fetch(self, url: str, param: str) -> bytes:
        try:
            return await asyncio.wait_for(self._get(url, param), self.timeout)
        except TimeoutError:
            raise APIError(400, f"{param}: fetching {url} took longer than {self.timeout:g} s", param=param) from None
        except httpx.HTTPError as e:  # the remote's own words (a banner, a page) are not passed on
            raise APIError(400, f"{param}: could not fetch {url} ({type(e).__name__})", param=param) from None

    async def _get(self, url: str, param: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout) as client:
            for _ in range(4):
                await self._check_address(url, param)
                async with client.stream("GET", url) as r:
                    if r.is_redirect:
                        target = urljoin(url, r.headers.get("location", ""))
                        if urlparse(target).scheme.lower() not in ("http", "https"):
                            raise APIError(400, f"{param}: {url} redirects to a URL that is not http(s)", param=param)
                        url = target
                        continue
                    if r.status_code != 200:
                        raise APIError(400, f"{param}: {url} answered HTTP {r.status_code}", param=param)
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > self.max_remote_bytes:
                            raise APIError(413, f"{param}: {url} is larger than {self.max_remote_bytes} bytes",
                                           param=param)  # fmt: skip
                    return bytes(data)
        raise APIError(400, f"{param}: {url} redirects more than 3 times", param=param)

    async def _check_address(self, url: str, param: str) -> None:
        """Refuse a host that resolves to a loopback, private, link-local or otherwise non-public address."""
        if self.allow_private:
            return
        parts = urlparse(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise APIError(400, f"{param}: cannot resolve the host of {url}", param=param) from None
        for *_, addr in infos:
            ip = ipaddress.ip_address(addr[0].split("%")[0])
            if not ip.is_global or ip.is_multicast:
                raise APIError(400, f"{param}: {url} is on a non-public address; this server fetches only public "
                                    "ones", param=param)  # fmt: skip
