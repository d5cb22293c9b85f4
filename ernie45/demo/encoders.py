"""Stage 0 of the demo recipe: the media encoders learn to see and hear before the trunk reads them.

Trained through the trunk alone, an encoder is taught by about one answer token per sample ("red" in "The
square is red."): the shipped model learned counting that way but never shape (chance) nor which way a
shape moves (it knew the axis, not the sign). Here each picture's, video's and clip's facts supervise the
vision and audio paths (encoder + resampler, exactly what the trunk will read) directly, through small heads
that are thrown away afterwards:

- shape scenes: what lies under each token (its shape and colour, or nothing); the colour of each shape and
  the shape of each colour (or none), each read by one attention query over the tokens (`Probe`, a trunk
  layer's read in miniature); the count from their mean — so a token that says "star" also says which colour,
  as the trunk's question will ask;
- bar charts: each token's column's bar value and label (the chart gives each label one token column); each
  label's value (0 = no such bar) and which bar is the tallest and the shortest, by queries over the tokens;
- videos: the motion, colour and shape from the mean of all tokens — so the motion must be visible in each
  token (the resampler's frame pairs), not only across them;
- speech: the words, by CTC over the audio tokens.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model.trunk import ENCODER_MODULES
from ..processing.processor import Processor
from .scenes import COLOURS, MOTIONS, NUMBER_WORDS, SHAPES, bar_chart, moving_video, shape_scene
from .speech import speak
from .tasks import SPOKEN_OPS

log = logging.getLogger("ernie45.train")
WORDS = (*NUMBER_WORDS, "what", "is", *SPOKEN_OPS)  # every word the demo's speech says
COLOUR_NAMES = tuple(COLOURS)
LABELS = "ABCDE"


class Probe(nn.Module):
    """One attention read, as a trunk layer makes it: a learned query per name weighs the tokens by their keys
    and sums their class logits."""

    def __init__(self, width: int, queries: int, classes: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        self.key = nn.Linear(width, dim)
        self.value = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, queries, classes]."""
        weights = (self.query @ self.key(tokens).transpose(1, 2) * self.query.shape[-1] ** -0.5).softmax(-1)
        return weights @ self.value(tokens)


class Heads(nn.Module):
    def __init__(self, width: int, audio: bool) -> None:
        super().__init__()
        self.colour_of = Probe(width, len(SHAPES), 1 + len(COLOUR_NAMES))  # 0 = no such shape
        self.shape_of = Probe(width, len(COLOUR_NAMES), 1 + len(SHAPES))  # 0 = no such colour
        self.count = nn.Linear(width, 4)
        self.token = nn.Linear(width, 1 + len(SHAPES) + 1 + len(COLOUR_NAMES))  # what lies under each token
        self.column = nn.Linear(width, 10 + len(LABELS))  # a chart token: its column's bar value and label
        self.value_of = Probe(width, len(LABELS), 10)  # 0 = no such bar
        self.extreme = Probe(width, 2, len(LABELS))  # tallest, shortest
        self.video = nn.Linear(width, len(MOTIONS) + len(COLOUR_NAMES) + len(SHAPES))
        self.words = nn.Linear(width, 1 + len(WORDS)) if audio else None  # 0 = CTC blank


def _scene_batch(rng: random.Random, n: int, grid: int):
    """Pictures; per shape and per colour, the other attribute (0 = absent, -100 = twice: not asked); per token
    (row-major), the shape and colour under it: its centre in the shape's box, or the shape's centre in it."""
    images, counts = [], torch.zeros(n, dtype=torch.long)
    colour_of = torch.zeros(n, len(SHAPES), dtype=torch.long)
    shape_of = torch.zeros(n, len(COLOUR_NAMES), dtype=torch.long)
    under = torch.zeros(n, 2, grid, grid, dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    for b in range(n):
        img, objects, where = shape_scene(rng, geometry=True)
        images.append(img)
        counts[b] = len(objects) - 1
        shapes, colours = [s for _, s in objects], [c for c, _ in objects]
        for (colour, shape), (cx, cy, r) in zip(objects, where, strict=True):
            i, j = SHAPES.index(shape), COLOUR_NAMES.index(colour)
            colour_of[b, i] = 1 + j if shapes.count(shape) == 1 else -100
            shape_of[b, j] = 1 + i if colours.count(colour) == 1 else -100
            inside = ((centres[:, None] - cy).abs() <= r) & ((centres[None, :] - cx).abs() <= r)
            inside[int(cy * grid), int(cx * grid)] = True  # the token under the centre, however small the shape
            under[b, 0][inside], under[b, 1][inside] = 1 + i, 1 + j
    return images, counts, colour_of, shape_of, under.flatten(2)


def _column_targets(values: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 5] bar values (0 = absent) -> [B, 2, grid * grid]: each token's column's value, and its label where
    the bar exists (-100 elsewhere). The chart gives label k the k-th fifth of the width (`bar_chart`)."""
    column = (torch.arange(grid) * len(LABELS)) // grid  # the label slot under each token column
    value = values[:, column][:, None, :].expand(-1, grid, -1)
    label = torch.where(value > 0, column.expand_as(value), -100)
    return torch.stack([value, label], 1).flatten(2)


def _square(img: Image.Image, side: int) -> Image.Image:
    """The picture at exactly the demo's square size, as the processor would resize it (so every picture gets
    the same token grid: smart_resize's rounding sends a few source sizes one step up)."""
    return img.resize((side, side), Image.Resampling.BICUBIC)


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(-1) == target).float().mean())


def pretrain_encoders(model: nn.Module, proc: Processor, steps: int, batch: int = 16, lr: float = 1e-3,
                      seed: int = 0, log_every: int = 50) -> dict[str, float]:  # fmt: skip
    """Train the vision and audio paths of `model` in place for `steps` steps; returns the last step's accuracies
    and its summed loss ("loss")."""
    trunk, c = model.model, model.config
    torch.manual_seed(seed)
    rng = random.Random(seed * 7_919 + 17)
    side = int(proc.image.min_pixels**0.5)
    grid = side // (proc.image.patch_size * proc.image.merge_size)
    tokens = grid * grid
    audio = hasattr(trunk, "audio_tower")
    heads = Heads(c.hidden_size, audio)
    encoder = [p for n, p in trunk.named_parameters() if n.split(".")[0] in ENCODER_MODULES]
    opt = torch.optim.AdamW([*encoder, *heads.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + _cos(s / steps)))
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        losses, stats = {}, {}
        images, counts, colour_of, shape_of, under = _scene_batch(rng, batch, grid)
        x = proc.image([_square(img, side) for img in images])
        feats = trunk.encode_vision(x["pixel_values"], x["image_grid_thw"]).view(batch, tokens, -1)
        c_log, s_log, n_log = heads.colour_of(feats), heads.shape_of(feats), heads.count(feats.mean(1))
        losses["colour"] = F.cross_entropy(c_log.flatten(0, 1), colour_of.flatten(), ignore_index=-100)
        losses["shape"] = F.cross_entropy(s_log.flatten(0, 1), shape_of.flatten(), ignore_index=-100)
        losses["count"] = F.cross_entropy(n_log, counts)
        t_log = heads.token(feats).split([1 + len(SHAPES), 1 + len(COLOUR_NAMES)], dim=-1)
        losses["tokens"] = sum(F.cross_entropy(lg.transpose(1, 2), under[:, k]) for k, lg in enumerate(t_log))
        stats["colour"] = _accuracy(c_log[colour_of > 0], colour_of[colour_of > 0])
        stats["shape"] = _accuracy(s_log[shape_of > 0], shape_of[shape_of > 0])
        stats["count"] = _accuracy(n_log, counts)

        charts = [bar_chart(rng) for _ in range(batch // 2)]
        x = proc.image([_square(img, side) for img, _ in charts])
        values = torch.tensor([[v.get(label, 0) for label in LABELS] for _, v in charts])
        extremes = torch.tensor([[LABELS.index(f(v, key=v.get)) for f in (max, min)] for _, v in charts])
        feats = trunk.encode_vision(x["pixel_values"], x["image_grid_thw"]).view(len(charts), tokens, -1)
        v_log, e_log = heads.value_of(feats), heads.extreme(feats)
        losses["bar"] = F.cross_entropy(v_log.flatten(0, 1), values.flatten())
        losses["extreme"] = F.cross_entropy(e_log.flatten(0, 1), extremes.flatten())
        columns = _column_targets(values, grid)
        k_log = heads.column(feats).split([10, len(LABELS)], dim=-1)
        losses["columns"] = sum(F.cross_entropy(lg.transpose(1, 2), columns[:, k]) for k, lg in enumerate(k_log))
        stats["bar value"] = _accuracy(v_log[values > 0], values[values > 0])
        stats["tallest"] = _accuracy(e_log[:, 0], extremes[:, 0])
        stats["shortest"] = _accuracy(e_log[:, 1], extremes[:, 1])

        videos = [moving_video(rng) for _ in range(batch // 2)]
        x = proc.video([v for v, *_ in videos])
        feats = trunk.encode_vision(x["pixel_values_videos"], x["video_grid_thw"])
        per_video = trunk.resampler_model.tokens_per_item(x["video_grid_thw"])
        logits = heads.video(torch.stack([f.mean(0) for f in feats.split(per_video)]))
        parts = logits.split([len(MOTIONS), len(COLOUR_NAMES), len(SHAPES)], dim=-1)
        targets = [torch.tensor([names.index(v[i]) for v in videos])
                   for names, i in ((MOTIONS, 1), (COLOUR_NAMES, 2), (SHAPES, 3))]  # fmt: skip
        losses["video"] = sum(F.cross_entropy(p, t) for p, t in zip(parts, targets, strict=True))
        stats["direction"] = _accuracy(parts[0], targets[0])

        if audio:
            losses["speech"], stats["speech clips"] = _speech_loss(trunk, proc, heads, rng, batch // 2)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder, 1.0)
        opt.step()
        sched.step()
        stats["loss"] = loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            eta = (time.perf_counter() - start) / (step + 1) * (steps - step - 1)
            log.info("encoders %d/%d loss %.3f %s (eta %.0fs)", step + 1, steps, loss.item(),
                     " ".join(f"{k} {v:.0%}" for k, v in stats.items() if k != "loss"), eta)  # fmt: skip
    model.zero_grad(set_to_none=True)
    return stats


def _cos(x: float) -> float:
    return math.cos(math.pi * min(x, 1.0))


def _speech_loss(trunk, proc: Processor, heads: Heads, rng: random.Random, n: int) -> tuple[torch.Tensor, float]:
    """CTC over the audio tokens of `n` fresh clips (spoken digits and spoken questions)."""
    texts = []
    for _ in range(n):
        if rng.random() < 0.7:
            texts.append(" ".join(NUMBER_WORDS[rng.randint(0, 9)] for _ in range(rng.randint(1, 4))))
        else:
            a, b = NUMBER_WORDS[rng.randint(0, 9)], NUMBER_WORDS[rng.randint(0, 9)]
            texts.append(f"what is {a} {rng.choice(list(SPOKEN_OPS))} {b}")
    x = proc.audio([speak(t, rng) for t in texts])
    feats = trunk.encode_audio(x["audio_values"], x["audio_lengths"])
    per = proc.audio.config.mel_frames_per_token
    lengths = x["audio_lengths"] // per
    logp = heads.words(feats).log_softmax(-1)
    padded = nn.utils.rnn.pad_sequence(list(logp.split(lengths.tolist())))  # [T, N, C]
    targets = [torch.tensor([1 + WORDS.index(w) for w in t.split()]) for t in texts]
    loss = F.ctc_loss(padded, torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]), zero_infinity=True)
    right = 0
    for i, t in enumerate(targets):  # greedy CTC decode: collapse repeats, drop blanks
        best = padded[: lengths[i], i].argmax(-1).tolist()
        words = [w for k, w in enumerate(best) if w and (k == 0 or best[k - 1] != w)]
        right += words == t.tolist()
    return loss, right / n
