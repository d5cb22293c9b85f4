"""Reading media from whatever a user hands over: a path, bytes, a PIL image, a numpy array or a ``data:`` URL.

Every failure is a ValueError that names the input and the problem. Images larger than a pixel cap
are refused from their header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

MediaInput = Union[str, Path, bytes, "Image.Image", np.ndarray]
MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images unread: 8000 x 8000 is already 4x the model's cap


class Cancelled(Exception):
    """The request that wanted this media has gone: decoding stops at the next frame or page."""


_cancel = threading.local()


@contextlib.contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Media decoding on this thread stops (raises `Cancelled`) soon after `event` is set."""
    _cancel.event = event
    try:
        yield
    finally:
        _cancel.event = None


def check_cancelled() -> None:
    """Raise `Cancelled` if this thread's decoding was cancelled (called between frames, pages and items)."""
    event = getattr(_cancel, "event", None)
    if event is not None and event.is_set():
        raise Cancelled("the request was cancelled while its media were being read")


@dataclass(frozen=True)
class Fit:
    """An image to use scaled down to fit `side` x `side` (never up): OpenAI's `detail: "low"`. Decoded where the
    processor decodes every image (a server's bounded, cancellable media pool), not where the request is read."""

    source: MediaInput
    side: int


def describe(source: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(source, Fit):
        return describe(source.source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"<data URL of {len(source)} characters>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]} {source.mode}>"
    return str(source)


def read_bytes(source: str | Path | bytes) -> bytes | Path:
    """bytes for bytes and data: URLs; a checked Path for paths."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{describe(source)}: only base64 data: URLs are supported")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{describe(source)}: invalid base64 payload ({e})") from None
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return path


def load_image(source: MediaInput, max_pixels: int = MAX_IMAGE_PIXELS,
               target_pixels: int | None = None) -> Image.Image:  # fmt: skip
    """An RGB PIL image from any supported input. Over `max_pixels` it is refused from its header, unread;
    target_pixels: a JPEG over 16x this decodes at a reduced scale (1/2, 1/4 or 1/8) that keeps at least 4x this
    many pixels, as it will be resized down to it anyway (a fraction of a full decode's memory and time)."""
    if isinstance(source, Fit):
        fit = source.side**2
        img = load_image(source.source, max_pixels, min(target_pixels, fit) if target_pixels else fit)
        if max(img.size) <= source.side:
            return img
        img = img.copy()
        img.thumbnail((source.side, source.side))
        return img
    if isinstance(source, Image.Image):
        return _check_size(source, source, max_pixels).convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(_to_uint8_hwc(source)).convert("RGB")
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise ValueError(
            f"cannot read an image from a {type(source).__name__}; pass a path, bytes, PIL image, "
            "numpy array or data: URL"
        )
    data = read_bytes(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            _check_size(img, source, max_pixels)  # from the header: nothing decoded yet
            w, h = img.size
            if target_pixels and img.format == "JPEG" and w * h > 16 * target_pixels:
                scale = (4 * target_pixels / (w * h)) ** 0.5
                img.draft("RGB", (max(1, int(w * scale) + 1), max(1, int(h * scale) + 1)))
            img.load()
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{describe(source)}: not a readable image ({e})") from None
    return img.convert("RGB")


def _check_size(img: Image.Image, source: Any, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{describe(source)}: {w}x{h} is {w * h:,} pixels, over the {max_pixels:,} pixel limit")
    if w < 1 or h < 1:
        raise ValueError(f"{describe(source)}: empty image")
    return img


def _to_uint8_hwc(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"{describe(a)}: expected an HxW, HxWx3 or HxWx4 image array")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{describe(a)}: unsupported array dtype")
        a = a.astype(np.float64)
        a = np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255).round().astype(np.uint8)
    return a
