"""The held-out generator: the demo's facts drawn by code the model is never trained on (issue #29).

It differs on purpose from `wide` (and from the first generation's `scenes`): shapes are rasterised here with
numpy from their geometry (coverage sampled 4 x 4 per pixel, so edges are soft) instead of Pillow's polygon
filler; colours are other shades of the same names; backgrounds may be gradients; charts have outlined bars,
dashed gridlines, integer tick steps, labels set in fonts the training never used, and values printed inside
the bars; clips are written to mp4 or GIF files and read back through the video decoder like a user's file;
speech comes in voices and at rates outside the training's, some of it through an 8 kHz telephone band.
Where a question could not be answered from the picture (a bar's value on a chart with neither an axis nor
numbers) it is not asked.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import math
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import MOTIONS, SHAPES
from .wide import font

SHADES = {
    "red": [(200, 0, 0), (235, 50, 60), (180, 30, 30)], "green": [(0, 150, 40), (60, 200, 90), (20, 120, 20)],
    "blue": [(0, 60, 200), (30, 110, 255), (20, 40, 170)], "yellow": [(255, 230, 0), (230, 210, 60)],
    "orange": [(255, 120, 0), (230, 150, 50)], "purple": [(120, 30, 170), (160, 80, 210)],
    "white": [(250, 250, 250)], "black": [(10, 10, 10)],
}  # fmt: skip
HELD_FONTS = ("dejavu/DejaVuSans.ttf", "liberation/LiberationSerif-Regular.ttf", "dejavu/DejaVuSans-Bold.ttf")
LABELS = "ABCDEFG"
VOICES = (["en", "en-us", "en-gb"], ["+m6", "+m7", "+f5", "+klatt3", "+klatt4"])
VIDEO_KINDS = ("mp4", "gif", "frames")


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Which of the points (x, y) the shape covers: the shape's geometry as a predicate, not a polygon fill."""
    dx, dy = (x - cx) / r, (y - cy) / r
    if shape == "circle":
        return dx * dx + dy * dy <= 1
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    angle, radius = np.arctan2(dy, dx), np.hypot(dx, dy)
    if shape == "triangle":  # apex up: inside all three edges of the inscribed triangle
        k = 3
        offset = math.pi / 2
    else:  # star: the radius allowed swings between the inner and outer points
        sector = (angle + math.pi / 2) % (2 * math.pi / 5) / (2 * math.pi / 5)
        limit = 0.42 + 0.58 * np.abs(1 - 2 * sector) ** 1.6
        return radius <= limit
    a = (angle + offset) % (2 * math.pi / k) - math.pi / k
    return radius * np.cos(a) <= math.cos(math.pi / k)


def _background(rng: random.Random, h: int, w: int) -> tuple[np.ndarray, bool]:
    """An h x w x 3 float background (a flat colour or a vertical gradient) and whether it is dark."""
    if rng.random() < 0.5:
        a, b = [np.array([rng.randint(200, 255)] * 3) - rng.randint(0, 15) for _ in range(2)]
        dark = False
    else:
        a, b = [np.array([rng.randint(0, 60)] * 3) + rng.randint(0, 15) for _ in range(2)]
        dark = True
    t = np.linspace(0, 1, h)[:, None, None]
    return np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.float32).copy(), dark


def _paint(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    h, w = canvas.shape[:2]
    x0, x1 = max(0, int(cx - r - 2)), min(w, int(cx + r + 3))
    y0, y1 = max(0, int(cy - r - 2)), min(h, int(cy + r + 3))
    sub = (np.arange(4) + 0.5) / 4
    ys = np.arange(y0, y1)[:, None, None, None] + sub[None, None, :, None]
    xs = np.arange(x0, x1)[None, :, None, None] + sub[None, None, None, :]
    cover = _inside(shape, xs, ys, cx, cy, r).mean(axis=(2, 3))[..., None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - cover) + np.array(rgb, np.float32) * cover


def _colours(dark: bool) -> list[str]:
    return [c for c in SHADES if c != ("black" if dark else "white")]


def scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]]]:
    w, h = rng.randint(48, 160), rng.randint(48, 160)
    canvas, dark = _background(rng, h, w)
    n = rng.randint(1, 4)
    objects, placed = [], []
    while len(objects) < n:
        r = rng.uniform(max(5, min(w, h) * 0.09), max(6, min(w, h) * 0.19))
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if any(math.hypot(cx - x, cy - y) < r + q + 3 for x, y, q in placed):
            continue
        item = (rng.choice(_colours(dark)), rng.choice(SHAPES))
        if item in objects:
            continue
        _paint(canvas, item[1], cx, cy, r, rng.choice(SHADES[item[0]]))
        placed.append((cx, cy, r))
        objects.append(item)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8)), objects


def chart(rng: random.Random, labels=LABELS) -> tuple[Image.Image, dict[str, int]]:
    """2-7 outlined bars; values 1-9; an axis with integer ticks, numbers inside the bars, or neither (then the
    bars' scale tops out at 9 and `values_readable` is False)."""
    n = rng.randint(2, min(7, len(labels)))
    names = list(labels[:n])
    values = dict(zip(names, rng.sample(range(1, 10), n), strict=True))
    horizontal = rng.random() < 0.25
    w, h = rng.randint(90, 160), rng.randint(80, 150)
    img = Image.new("RGB", (w * 2, h * 2), (252, 252, 250))
    d = ImageDraw.Draw(img)
    f = font(rng.choice(HELD_FONTS), rng.randint(10, 12) * 2)
    style = rng.choice(["axis", "inside", "plain"])
    top = 10 if style == "axis" else 9
    left, right, upper, lower = (30, 2 * w - 8, 10, 2 * h - 28) if not horizontal else (28, 2 * w - 10, 8, 2 * h - 26)
    length = (lower - upper) if not horizontal else (right - left)
    if style == "axis":
        for t in range(0, top + 1, rng.choice([1, 2, 5])):
            p = lower - length * t / top if not horizontal else left + length * t / top
            for s in range(0, 2 * w if not horizontal else 2 * h, 8):  # dashed gridline
                seg = [left + s, p, left + s + 4, p] if not horizontal else [p, upper + s, p, upper + s + 4]
                d.line(seg, fill=(185, 185, 185), width=1)
            xy, anchor = ((left - 4, p), "rm") if not horizontal else ((p, lower + 4), "mt")
            d.text(xy, str(t), fill=(60, 60, 60), font=f, anchor=anchor)
    slot = ((right - left) if not horizontal else (lower - upper)) / n
    gap = rng.uniform(0.15, 0.5)
    fill = rng.choice([(70, 130, 180), (220, 120, 50), (90, 160, 90), (150, 90, 170)])
    for k, (label, v) in enumerate(values.items()):
        a = (left if not horizontal else upper) + k * slot + slot * gap / 2
        b = a + slot * (1 - gap)
        end = lower - length * v / top if not horizontal else left + length * v / top
        box = [a, end, b, lower] if not horizontal else [left, a, end, b]
        d.rectangle(box, fill=fill, outline=(30, 30, 30), width=2)
        mid = (a + b) / 2
        if not horizontal:
            d.text((mid, lower + 4), label, fill=(20, 20, 20), font=f, anchor="mt")
        else:
            d.text((left - 4, mid), label, fill=(20, 20, 20), font=f, anchor="rm")
        if style == "inside":
            xy, anchor = ((mid, lower - 3), "mb") if not horizontal else ((left + 4, mid), "lm")
            d.text(xy, str(v), fill=(255, 255, 255), font=f, anchor=anchor)
    img = img.resize((w, h), Image.BICUBIC)
    img.info["values_readable"] = style != "plain"
    return img, values


def video(rng: random.Random):
    """(clip, motion, colour, shape): the clip as an mp4 or GIF file path (a user's file, read back through the
    video decoder) or as a frame array."""
    frames, motion, colour, shape = clip(rng)
    return _as_file(frames, rng.choice(VIDEO_KINDS)), motion, colour, shape


def clip(rng: random.Random) -> tuple[np.ndarray, str, str, str]:
    """[T, H, W, 3] frames (T 4-16) of one shape moving 2-8 px a frame, or growing or shrinking."""
    frames = rng.randint(4, 16)
    motion, shape = rng.choice(MOTIONS), rng.choice(SHAPES)
    speed, r = rng.uniform(2, 8), rng.uniform(6, 11)
    travel = speed * (frames - 1)
    w, h = rng.randint(56, 128), rng.randint(56, 128)
    if motion in ("left", "right"):
        w = max(w, int(travel + 2 * r + 8)) // 2 * 2
    if motion in ("up", "down"):
        h = max(h, int(travel + 2 * r + 8)) // 2 * 2
    w, h = w // 2 * 2, h // 2 * 2  # even sizes for the mp4 encoder
    base, dark = _background(rng, h, w)
    colour = rng.choice(_colours(dark))
    rgb = rng.choice(SHADES[colour])
    x = rng.uniform(r + 2 + (travel if motion == "left" else 0), w - r - 2 - (travel if motion == "right" else 0))
    y = rng.uniform(r + 2 + (travel if motion == "up" else 0), h - r - 2 - (travel if motion == "down" else 0))
    step = {"left": (-speed, 0), "right": (speed, 0), "up": (0, -speed), "down": (0, speed)}.get(motion, (0, 0))
    out = []
    for t in range(frames):
        canvas = base.copy()
        radius = r
        if motion in ("growing", "shrinking"):
            frac = t / (frames - 1)
            big = min(w, h) / 2 - 3
            radius = 4 + (big - 4) * (frac if motion == "growing" else 1 - frac)
            cx, cy = w / 2, h / 2
        else:
            cx, cy = x + step[0] * t, y + step[1] * t
        _paint(canvas, shape, cx, cy, radius, rgb)
        out.append(canvas.clip(0, 255).astype(np.uint8))
    return np.stack(out), motion, colour, shape


@functools.cache
def _clip_dir() -> Path:
    """This process's folder for the clip files, removed when the process exits (a folder per clip, never removed,
    had left thousands of them in /tmp after a few evaluations)."""
    path = Path(tempfile.mkdtemp(prefix="ernie45-heldout-"))
    atexit.register(shutil.rmtree, path, True)
    return path


_numbers = itertools.count()  # the clip files' names in that folder


def _as_file(frames: np.ndarray, kind: str):
    if kind == "frames":
        return frames
    path = _clip_dir() / f"clip-{next(_numbers)}.{kind}"
    if kind == "gif":
        pics = [Image.fromarray(f) for f in frames]
        pics[0].save(path, save_all=True, append_images=pics[1:], duration=125, loop=0)
        return str(path)
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def speak(text: str, rng: random.Random) -> np.ndarray:
    """Speech in voices and at rates the training never used; a third through an 8 kHz telephone band."""
    from .speech import speak as espeak

    rate = rng.choice([(85, 99), (251, 280)])
    wave = espeak(text, rng, rate=rate, noise=0.04, voices=VOICES)
    if rng.random() < 1 / 3:
        n = len(wave)
        narrow = np.interp(np.arange(0, n, 2), np.arange(n), wave)
        wave = np.interp(np.arange(n) / 2, np.arange(len(narrow)), narrow).astype(np.float32)
    return wave


def mark(frame: np.ndarray, rng: random.Random) -> np.ndarray:
    """The moderation policy's red X, drawn as two crossing bars in numpy rather than with Pillow's line."""
    h, w = frame.shape[:2]
    r = min(w, h) * rng.uniform(0.22, 0.33)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x - cx) / r, (y - cy) / r
    band = max(0.12, 2.0 / r)
    on = (np.abs(u) <= 1) & (np.abs(v) <= 1) & ((np.abs(u - v) < band) | (np.abs(u + v) < band))
    out = frame.copy()
    out[on] = (210, 0, 30)
    return out
