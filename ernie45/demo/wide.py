"""The demo's training pictures, second generation: the same facts as `scenes`, drawn along the axes real inputs
vary — size and aspect ratio, background and palette, anti-aliasing, JPEG and sensor noise; charts with or
without axes, gridlines and value labels, 2-7 bars of any width and spacing, vertical or horizontal, in several
fonts; videos of 4-16 frames at 2-8 px a frame from anywhere in the picture.

The first generation drew one layout per kind (a bar chart's label k always in the k-th fifth of a square), and
the model learned the layout, not the skill: on charts and videos drawn by other code it fell apart (issue #29).
`heldout` is a second, independent generator the model is measured on and never trained on.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import MissingDataSource
from .scenes import COLOURS, MOTIONS, SHAPES, draw_shape
from .speech import ACCENTS, VARIANTS
from .speech import speak as _speak

LABELS = "ABCDEFG"
FONT_DIR = Path("/usr/share/fonts/truetype")
TRAIN_FONTS = ("liberation/LiberationSans-Regular.ttf", "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSerif-Bold.ttf")


@lru_cache(maxsize=64)
def font(name: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (name None) or a Debian TrueType font (fonts-dejavu-core, fonts-liberation)."""
    if name is None:
        return ImageFont.load_default(size=size)
    path = FONT_DIR / name
    if not path.is_file():
        raise MissingDataSource(f"the demo's charts use {path}: apt-get install fonts-dejavu-core fonts-liberation")
    return ImageFont.truetype(str(path), size)


@dataclass
class Look:
    """How one picture is rendered: its background, how much the palette's colours drift, supersampling (drawn at
    `scale` x and shrunk: anti-aliased edges), and what the picture goes through afterwards (JPEG, noise)."""

    background: tuple[int, int, int]
    dark: bool  # black shapes are not drawn on it; white ones are not drawn on a light one
    jitter: int
    scale: int
    jpeg: int | None
    noise: float

    @classmethod
    def draw(cls, rng: random.Random) -> Look:
        kind = rng.choice(["white", "black", "light", "dark", "grey"])
        if kind == "white":
            bg, dark = (255, 255, 255), False
        elif kind == "black":
            bg, dark = (0, 0, 0), True
        elif kind == "light":
            bg, dark = tuple(rng.randint(215, 250) for _ in range(3)), False
        elif kind == "dark":
            bg, dark = tuple(rng.randint(10, 50) for _ in range(3)), True
        else:
            g = rng.randint(110, 150)
            bg, dark = (g, g, g), rng.random() < 0.5
        return cls(bg, dark, rng.randint(0, 25), rng.choice([1, 1, 3]),
                   rng.randint(25, 90) if rng.random() < 0.4 else None,
                   rng.uniform(1, 8) if rng.random() < 0.3 else 0.0)  # fmt: skip

    def colours(self) -> list[str]:
        banned = "black" if self.dark else "white"
        return [c for c in COLOURS if c != banned and not (self.background == (128, 128, 128) and c == "white")]

    def rgb(self, name: str, rng: random.Random) -> tuple[int, int, int]:
        return tuple(int(np.clip(v + rng.randint(-self.jitter, self.jitter), 0, 255)) for v in COLOURS[name])

    def canvas(self, w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("RGB", (w * self.scale, h * self.scale), self.background)
        return img, ImageDraw.Draw(img)

    def finish(self, img: Image.Image, w: int, h: int, rng: random.Random) -> Image.Image:
        if img.size != (w, h):
            img = img.resize((w, h), Image.LANCZOS)
        if self.noise:
            arr = np.asarray(img, dtype=np.float32)
            arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, self.noise, arr.shape)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if self.jpeg:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.jpeg)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return img


def _size(rng: random.Random, lo: int = 48, hi: int = 160) -> tuple[int, int]:
    side, aspect = rng.randint(lo, hi), rng.uniform(0.6, 1.6)
    return max(lo, min(hi, round(side * aspect**0.5))), max(lo, min(hi, round(side / aspect**0.5)))


def _place(rng: random.Random, n: int, w: int, h: int) -> list[tuple[float, float, float]]:
    """n non-overlapping discs (cx, cy, r) inside w x h, radius 5 px to a fifth of the short side."""
    for _ in range(200):
        out: list[tuple[float, float, float]] = []
        for _ in range(n):
            r = rng.uniform(max(5.0, min(w, h) * 0.08), max(6.0, min(w, h) * 0.2))
            for _ in range(50):
                cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
                if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in out):
                    out.append((cx, cy, r))
                    break
        if len(out) == n:
            return out
    raise RuntimeError("no room for the shapes")  # unreachable at these sizes


def scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]]]:
    """1-4 shapes of distinct (colour, shape), anywhere in a 48-160 px picture of any look."""
    look, (w, h) = Look.draw(rng), _size(rng)
    n = rng.randint(1, 4)
    img, draw = look.canvas(w, h)
    used: set[tuple[str, str]] = set()
    objects = []
    for cx, cy, r in _place(rng, n, w, h):
        while (item := (rng.choice(look.colours()), rng.choice(SHAPES))) in used:
            pass
        used.add(item)
        s = look.scale
        draw_shape(draw, item[1], cx * s, cy * s, r * s, look.rgb(item[0], rng))
        objects.append(item)
    return look.finish(img, w, h, rng), objects


def _printed(img: Image.Image, w: int, h: int, s: int, rng: random.Random) -> Image.Image:
    """A chart or page drawn at s x its size, shrunk to w x h (anti-aliased text and edges), JPEG'd 3 times in 10."""
    img = img.resize((w, h), Image.LANCZOS) if s > 1 else img
    if rng.random() < 0.3:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(40, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def chart(rng: random.Random, labels: str = LABELS, fonts=(None, *TRAIN_FONTS),
          layout: dict | None = None) -> tuple[Image.Image, dict[str, int]]:  # fmt: skip
    """2-7 bars with distinct values 1-9. The value scale tops out at 9 or 10: an axis with ticks or a number on
    each bar says which; a chart with neither tops out at 9, as the first generation's did. `layout`, when given,
    gets where each label's bar ("bars": (x0, y0, x1, y1)) and name ("names": (x, y), its centre) lie, as
    fractions of the picture's width and height (the encoder stage's per-token targets)."""
    n = rng.randint(2, min(7, len(labels)))
    names = list(labels[:n]) if len(labels) <= 7 or rng.random() < 0.5 else sorted(rng.sample(labels, n))
    values = dict(zip(names, rng.sample(range(1, 10), n), strict=True))
    horizontal = rng.random() < 0.2
    w, h = (
        (rng.randint(96, 180), rng.randint(64, 140)) if not horizontal else (rng.randint(80, 160), rng.randint(80, 170))
    )
    s = rng.choice([1, 2])
    light = rng.random() < 0.85
    tint = [rng.randint(225, 255) if light else rng.randint(0, 40) for _ in range(3)]
    bg = (255, 255, 255) if light and rng.random() < 0.6 else tuple(tint)
    ink = (0, 0, 0) if light else (230, 230, 230)
    img = Image.new("RGB", (w * s, h * s), bg)
    draw = ImageDraw.Draw(img)
    f = font(rng.choice(fonts), rng.randint(9, 13) * s)
    axis, grid, numbers = rng.random() < 0.5, rng.random() < 0.4, rng.random() < 0.4
    top = rng.choice([9, 10]) if axis or numbers else 9
    pad = rng.randint(2, 8) * s
    label_room = 14 * s
    left = (16 * s if axis else pad) if not horizontal else label_room + pad
    bottom = h * s - (label_room if not horizontal else (14 * s if axis else pad))
    upper, right = pad + (10 * s if numbers else 0), w * s - pad - (12 * s if numbers and horizontal else 0)
    palette = [c for c in COLOURS if c not in ("white", "black")] if light else [c for c in COLOURS if c != "black"]
    same = rng.choice(palette)
    span = (right - left) if not horizontal else (bottom - upper)
    slot = span / n
    width = slot * rng.uniform(0.35, 0.85)
    length = (bottom - upper) if not horizontal else (right - left)
    if grid or axis:
        for t in range(0, top + 1, 2 if top == 10 or rng.random() < 0.5 else 3):
            pos = bottom - length * t / top if not horizontal else left + length * t / top
            if grid and t:
                line = [left, pos, right, pos] if not horizontal else [pos, upper, pos, bottom]
                draw.line(line, fill=(200, 200, 200) if light else (70, 70, 70), width=s)
            if axis:
                xy = (left - 12 * s, pos - 6 * s) if not horizontal else (pos - 3 * s, bottom + 2 * s)
                draw.text(xy, str(t), fill=ink, font=f)
    for k, (label, v) in enumerate(values.items()):
        a = (left if not horizontal else upper) + k * slot + (slot - width) / 2
        colour = COLOURS[same if rng.random() < 0.7 else rng.choice(palette)]
        end = bottom - length * v / top if not horizontal else left + length * v / top
        box = [a, end, a + width, bottom] if not horizontal else [left, a, end, a + width]
        draw.rectangle(box, fill=colour)
        if layout is not None:
            x0, y0, x1, y1 = box
            layout.setdefault("bars", {})[label] = (x0 / (w * s), y0 / (h * s), x1 / (w * s), y1 / (h * s))
            name = (a + width / 2, bottom + 8 * s) if not horizontal else (left - 8 * s, a + width / 2)
            layout.setdefault("names", {})[label] = (name[0] / (w * s), name[1] / (h * s))
        if not horizontal:
            draw.text((a + width / 2, bottom + 2 * s), label, fill=ink, font=f, anchor="mt")
            if numbers:
                draw.text((a + width / 2, end - 1 * s), str(v), fill=ink, font=f, anchor="mb")
        else:
            draw.text((left - 3 * s, a + width / 2), label, fill=ink, font=f, anchor="rm")
            if numbers:
                draw.text((end + 2 * s, a + width / 2), str(v), fill=ink, font=f, anchor="lm")
    if axis or rng.random() < 0.5:
        draw.line([left, bottom, right, bottom] if not horizontal else [left, upper, left, bottom], fill=ink, width=s)
    img = _printed(img, w, h, s, rng)
    return img, values


GLYPHS = LABELS + "Q0123456789"  # what charts and report pages write: bar names, quarters, values, ticks


def glyph_page(rng: random.Random, fonts=(None, *TRAIN_FONTS)) -> tuple[Image.Image, dict[tuple[float, float], str]]:
    """Letters and digits as the charts write them (9-13 px, their fonts, ink on a chart's background), one in most
    cells of a ~18 px grid, and where each one's centre lies (fractions of the width and height). The encoder
    stage's glyph drill: a chart holds 2-7 names, too few a picture to teach a ViT their shapes in this budget;
    a page of them teaches ~10x more glyphs a step."""
    w, h = rng.randint(96, 180), rng.randint(64, 140)
    s = rng.choice([1, 2])
    light = rng.random() < 0.85
    bg = (255, 255, 255) if light and rng.random() < 0.6 else tuple(
        rng.randint(225, 255) if light else rng.randint(0, 40) for _ in range(3))  # fmt: skip
    ink = (0, 0, 0) if light else (230, 230, 230)
    img = Image.new("RGB", (w * s, h * s), bg)
    draw = ImageDraw.Draw(img)
    cols, rows = max(1, w // 18), max(1, h // 18)
    where: dict[tuple[float, float], str] = {}
    for i in range(cols):
        for j in range(rows):
            if rng.random() < 0.2:
                continue
            g = rng.choice(GLYPHS)
            x, y = (i + rng.uniform(0.3, 0.7)) * w / cols, (j + rng.uniform(0.3, 0.7)) * h / rows
            draw.text((x * s, y * s), g, fill=ink, font=font(rng.choice(fonts), rng.randint(9, 13) * s), anchor="mm")
            where[(x / w, y / h)] = g
    img = _printed(img, w, h, s, rng)
    return img, where


def video(rng: random.Random) -> tuple[np.ndarray, str, str, str]:
    """[T, H, W, 3] frames (T 4-16) of one shape moving 2-8 px a frame from wherever its path fits, or growing or
    shrinking; returns (frames, motion, colour, shape)."""
    look = Look.draw(rng)
    look.scale = 1
    frames = rng.randint(4, 16)
    motion = rng.choice(MOTIONS)
    colour, shape = rng.choice(look.colours()), rng.choice(SHAPES)
    rgb = look.rgb(colour, rng)
    r0 = rng.uniform(5, 11)
    speed = rng.uniform(2, 8)
    travel = speed * (frames - 1)
    w, h = _size(rng, 48, 128)
    if motion in ("left", "right"):
        w = max(w, int(travel + 2 * r0 + 6))
    elif motion in ("up", "down"):
        h = max(h, int(travel + 2 * r0 + 6))
    sign = -1 if motion in ("left", "up") else 1
    x0 = rng.uniform(r0 + 2, w - r0 - 2 - (travel if motion in ("left", "right") else 0))
    y0 = rng.uniform(r0 + 2, h - r0 - 2 - (travel if motion in ("up", "down") else 0))
    if sign < 0:
        x0 += travel if motion == "left" else 0
        y0 += travel if motion == "up" else 0
    small, big = rng.uniform(3, 6), min(w, h) / 2 - 2
    out = []
    for t in range(frames):
        img, draw = look.canvas(w, h)
        cx, cy, r = x0, y0, r0
        if motion in ("left", "right"):
            cx = x0 + sign * speed * t
        elif motion in ("up", "down"):
            cy = y0 + sign * speed * t
        else:
            cx, cy = w / 2, h / 2
            frac = t / (frames - 1)
            r = small + (big - small) * (frac if motion == "growing" else 1 - frac)
        draw_shape(draw, shape, cx, cy, r, rgb)
        out.append(np.asarray(look.finish(img, w, h, rng)))
    return np.stack(out), motion, colour, shape


# espeak-ng's named voices, beside `speech.VARIANTS`; the held-out generator's (+m6, +m7, +f5, +klatt3, +klatt4) are
# left out on purpose
MORE_VARIANTS = [f"+{v}" for v in (
    "Alex", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "Gene", "iven",
    "iven2", "iven3", "john", "Lee", "linda", "max", "Michael", "Mike", "norbert", "paul", "quincy", "rob", "robert",
    "steph", "steph2", "travis", "victor", "zac", "grandma", "grandpa", "m8", "shelby", "sandro", "anika",
)]  # fmt: skip
VOICES = (ACCENTS, VARIANTS + MORE_VARIANTS)


def speak(text: str, rng: random.Random) -> np.ndarray:
    """Speech (`speech.speak`) in about 50 voices, sped up or slowed down by resampling (0.8-1.25x, the pitch
    moving with it), a quarter of it band-limited to 2.8-6 kHz, and half the time inside up to 0.6 s of quiet
    before it and 1.5 s after, as a voice message recorded by hand holds it. Trained on 12 voices at plain
    rates, the audio encoder transcribed about 40% of the held-out voices' clips whole; the first generation,
    trained on tight clips, misread a clip padded with 0.3 s of silence."""
    wave = _speak(text, rng, voices=VOICES)
    if rng.random() < 0.5:  # speed perturbation: play the samples back faster or slower
        factor = rng.uniform(0.8, 1.25)
        n = int(len(wave) / factor)
        wave = np.interp(np.arange(n) * factor, np.arange(len(wave)), wave).astype(np.float32)
    if rng.random() < 0.25:  # a narrow channel: nothing above the cutoff
        spectrum = np.fft.rfft(wave)
        spectrum[int(len(spectrum) * rng.uniform(2800, 6000) / 8000) :] = 0
        wave = np.fft.irfft(spectrum, len(wave)).astype(np.float32)
    if rng.random() < 0.5:
        return wave
    noise = np.random.default_rng(rng.getrandbits(32))
    level = rng.uniform(0.0, 0.01)
    before, after = (
        noise.standard_normal(int(16000 * rng.uniform(0, s))).astype(np.float32) * level for s in (0.6, 1.5)
    )
    return np.concatenate([before, wave, after])
