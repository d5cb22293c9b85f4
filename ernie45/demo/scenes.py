"""Synthetic pictures for the demo model: shape scenes, bar charts and 8-frame moving-shape videos.

Every generator takes a `random.Random` and returns the media plus the facts the questions ask about.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 230), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (255, 255, 255), "black": (0, 0, 0),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    pts = []  # star: 5 outer and 5 inner points
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)


def shape_scene(rng: random.Random, size: int | None = None, geometry: bool = False):
    """1-4 shapes of distinct (shape, colour) on white or black; returns the image and [(colour, shape)] (and,
    with `geometry`, each shape's centre and radius as fractions of the side)."""
    size = size or rng.randint(64, 96)
    bg_name = rng.choice(["white", "black"])
    img = Image.new("RGB", (size, size), COLOURS[bg_name])
    draw = ImageDraw.Draw(img)
    n = rng.randint(1, 4)
    places = rng.sample([(i, j) for i in range(2) for j in range(2)], n)  # one shape per quadrant: no overlap
    colours = [c for c in COLOURS if c != bg_name]
    used: set[tuple[str, str]] = set()
    objects, where = [], []
    for i, j in places:
        while True:
            item = (rng.choice(colours), rng.choice(SHAPES))
            if item not in used:
                break
        used.add(item)
        r = rng.uniform(8, min(16, size / 4 - 2))
        cx = (i + 0.5) * size / 2 + rng.uniform(-2, 2)
        cy = (j + 0.5) * size / 2 + rng.uniform(-2, 2)
        draw_shape(draw, item[1], cx, cy, r, COLOURS[item[0]])
        objects.append(item)
        where.append((cx / size, cy / size, r / size))
    return (img, objects, where) if geometry else (img, objects)


def bar_chart(rng: random.Random, size: int = 96) -> tuple[Image.Image, dict[str, int]]:
    """2-5 bars labelled A-E with distinct integer values 1-9.

    Each label has its own fifth of the width (A the first, E the last, whether or not the later bars exist),
    so at the demo's 5 x 5 token grid every bar and its label fall in one token column.
    """
    n = rng.randint(2, 5)
    labels = "ABCDE"[:n]
    values = dict(zip(labels, rng.sample(range(1, 10), n), strict=True))
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=10)
    base, top = size - 14, 6
    slot = size / 5
    for k, (label, v) in enumerate(values.items()):
        x0, x1 = k * slot + slot * 0.2, (k + 1) * slot - slot * 0.2
        y = base - (base - top) * v / 9
        draw.rectangle([x0, y, x1, base], fill=(40, 70, 230))
        draw.text(((x0 + x1) / 2 - 3, base + 1), label, fill=(0, 0, 0), font=font)
    draw.line([1, base, size - 2, base], fill=(0, 0, 0))
    return img, values


MOTIONS = ("left", "right", "up", "down", "growing", "shrinking")


def moving_video(rng: random.Random, frames: int = 8) -> tuple[np.ndarray, str, str, str]:
    """[T, H, W, 3] uint8 frames of one shape moving or changing size; returns (video, motion, colour, shape)."""
    size = rng.randint(48, 64)
    bg_name = rng.choice(["white", "black"])
    colour = rng.choice([c for c in COLOURS if c != bg_name])
    shape = rng.choice(SHAPES)
    motion = rng.choice(MOTIONS)
    r0 = rng.uniform(7, 10)
    step = (size - 2 * r0 - 8) / (frames - 1)
    cx0, cy0 = rng.uniform(r0 + 4, size - r0 - 4), rng.uniform(r0 + 4, size - r0 - 4)
    out = []
    for t in range(frames):
        img = Image.new("RGB", (size, size), COLOURS[bg_name])
        cx, cy, r = cx0, cy0, r0
        if motion == "left":
            cx = size - r0 - 4 - t * step
        elif motion == "right":
            cx = r0 + 4 + t * step
        elif motion == "up":
            cy = size - r0 - 4 - t * step
        elif motion == "down":
            cy = r0 + 4 + t * step
        else:
            cx = cy = size / 2
            grow = 4 + t * (size / 2 - 6) / (frames - 1)
            r = grow if motion == "growing" else size / 2 - 2 - t * (size / 2 - 6) / (frames - 1)
        draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
        out.append(np.asarray(img))
    return np.stack(out), motion, colour, shape
