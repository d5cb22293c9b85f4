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
- speech: the words, by CTC over the audio tokens;
- glyphs (asked for by name): pages full of the letters and digits charts write, per token the glyph whose
  centre it holds. A chart's few names taught a ViT their shapes far too slowly (the model card's drills); a page
  of them teaches ~10x more glyphs a step.

`generator="wide"` draws the same facts from the second generation's pictures, charts, clips and voices
(`wide`): pictures keep their own aspect ratio (so the token grid varies and the per-token targets, which need
the first generation's fixed layout, are left out), charts have 2-7 bars labelled A-G anywhere, and speech
includes the agent's voice messages with 3-4 digit order numbers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model.trunk import ENCODER_MODULES
from ..processing.processor import Processor
from . import wide
from .scenes import COLOURS, MOTIONS, NUMBER_WORDS, SHAPES, bar_chart, moving_video, shape_scene
from .speech import speak
from .tasks import SPOKEN_OPS

log = logging.getLogger("ernie45.train")
AGENT_WORDS = ("please", "cancel", "order", "this", "about", "my")  # the agent's voice messages (`jobtasks`)
WORDS = (*NUMBER_WORDS, "what", "is", *SPOKEN_OPS, *AGENT_WORDS)  # every word the demo's speech says
COLOUR_NAMES = tuple(COLOURS)
LABELS = "ABCDE"
GENERATORS = ("first", "wide")
KINDS = ("pictures", "charts", "videos", "speech", "glyphs")
DEFAULT_KINDS = KINDS[:4]  # the glyph pages came later: a recipe asks for them by name


class Probe(nn.Module):
    """One attention read, as a trunk layer makes it: a learned query per name weighs the tokens by their keys
    and sums their class logits."""

    def __init__(self, width: int, queries: int, classes: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        self.key = nn.Linear(width, dim)
        self.value = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] (`mask` [B, N]: True where a token is real) -> [B, queries, classes]."""
        scores = self.query @ self.key(tokens).transpose(1, 2) * self.query.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return scores.softmax(-1) @ self.value(tokens)


class Heads(nn.Module):
    def __init__(self, width: int, audio: bool, labels: str = LABELS) -> None:
        super().__init__()
        self.colour_of = Probe(width, len(SHAPES), 1 + len(COLOUR_NAMES))  # 0 = no such shape
        self.shape_of = Probe(width, len(COLOUR_NAMES), 1 + len(SHAPES))  # 0 = no such colour
        self.count = nn.Linear(width, 4)
        self.token = nn.Linear(width, 1 + len(SHAPES) + 1 + len(COLOUR_NAMES))  # what lies under each token
        self.column = nn.Linear(width, 10 + len(labels))  # a chart token: its column's bar value and label
        self.value_of = Probe(width, len(labels), 10)  # 0 = no such bar
        self.extreme = Probe(width, 2, len(labels))  # tallest, shortest
        self.chart_token = nn.Linear(width, 2 * (1 + len(labels)) + 10)  # a free-layout chart token: the bar and
        # the label name under it (0 = none) and that bar's value
        self.video = nn.Linear(width, len(MOTIONS) + len(COLOUR_NAMES) + len(SHAPES))
        self.words = nn.Linear(width, 1 + len(WORDS)) if audio else None  # 0 = CTC blank
        self.glyph = nn.Linear(width, 1 + len(wide.GLYPHS))  # the letter or digit whose centre a token holds


def _scene_batch(rng: random.Random, n: int, grid: int):
    """Pictures, their (colour, shape) lists, and per token (row-major) the shape and colour under it: its centre
    in the shape's box, or the shape's centre in it."""
    images, objects = [], []
    under = torch.zeros(n, 2, grid, grid, dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    for b in range(n):
        img, objs, where = shape_scene(rng, geometry=True)
        images.append(img)
        objects.append(objs)
        for (colour, shape), (cx, cy, r) in zip(objs, where, strict=True):
            inside = ((centres[:, None] - cy).abs() <= r) & ((centres[None, :] - cx).abs() <= r)
            inside[int(cy * grid), int(cx * grid)] = True  # the token under the centre, however small the shape
            under[b, 0][inside], under[b, 1][inside] = 1 + SHAPES.index(shape), 1 + COLOUR_NAMES.index(colour)
    return images, objects, under.flatten(2)


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
                      seed: int = 0, log_every: int = 50, generator: str = "first",
                      kinds: list[str] | tuple[str, ...] = DEFAULT_KINDS,
                      weights: dict[str, float] | None = None,
                      speech_heldout_every: int = 0) -> dict[str, float]:  # fmt: skip
    """Train the vision and audio paths of `model` in place for `steps` steps on the `generator`'s media ("first":
    the first generation's fixed layouts; "wide": the second's), drawing only the `kinds` named (pictures, charts,
    videos, speech, glyphs: one kind alone takes the whole batch, and speech alone trains only the audio path);
    weights: a factor on each named kind's losses (1 for the others: a kind that learns slowly beside the rest can
    be weighted up); speech_heldout_every: log every that many steps and at the end the share of
    the held-out generator's clips (voices and rates never trained on) that the CTC head transcribes whole, so a
    long speech phase shows whether it still generalises. Returns the last step's accuracies and its summed loss
    ("loss"), with "held-out speech clips" when measured."""
    if generator not in GENERATORS:
        raise ValueError(f"encoder_pretrain: generator {generator!r} is not one of {', '.join(GENERATORS)}")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"encoder_pretrain: kinds {kinds!r}; name some of {', '.join(KINDS)}")
    if speech_heldout_every and (not isinstance(speech_heldout_every, int) or speech_heldout_every < 0
                                 or "speech" not in kinds):  # fmt: skip
        raise ValueError(f"encoder_pretrain: speech_heldout_every {speech_heldout_every!r} measures the speech kind: "
                         "give a whole number of steps and name speech among the kinds")  # fmt: skip
    weights = dict(weights or {})
    if set(weights) - set(kinds) or not all(isinstance(w, (int, float)) and w >= 0 for w in weights.values()):
        raise ValueError(f"encoder_pretrain: weights {weights!r}; give a factor >= 0 to some of the kinds {kinds!r}")
    trunk, c = model.model, model.config
    torch.manual_seed(seed)
    rng = random.Random(seed * 7_919 + 17)
    first = generator == "first"
    audio = hasattr(trunk, "audio_tower") and "speech" in kinds
    vision = {"pictures", "charts", "videos", "glyphs"} & set(kinds)
    if not vision and not audio:
        raise ValueError("encoder_pretrain: kinds [speech], but this model has no audio encoder")
    if speech_heldout_every and not audio:
        raise ValueError("encoder_pretrain: speech_heldout_every, but this model has no audio encoder to measure")
    heads = Heads(c.hidden_size, audio, LABELS if first else wide.LABELS)
    encoder = [p for n, p in trunk.named_parameters()
               if n.split(".")[0] in ENCODER_MODULES and (vision or n.startswith("audio_"))]  # fmt: skip
    opt = torch.optim.AdamW([*encoder, *heads.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + _cos(s / steps)))
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    pictures, charts = (_first_pictures, _first_charts) if first else (_wide_pictures, _wide_charts)
    half = batch if len(set(kinds)) == 1 else batch // 2  # a kind trained alone takes the whole batch
    draws = {
        "pictures": (pictures, batch),
        "charts": (charts, half),
        "videos": (partial(_videos, draw=moving_video if first else wide.video), half),
        "glyphs": (_glyphs, half),
        "speech": (partial(_speech, wide_voices=not first), half),
    }  # (in the order the data is drawn)
    drawn = [(kind, *draw) for kind, draw in draws.items() if kind in kinds and (kind != "speech" or audio)]
    for step in range(steps):
        losses, stats = {}, {}
        for kind, draw, n in drawn:
            before = set(losses)
            draw(trunk, proc, heads, rng, n, losses=losses, stats=stats)
            for k in set(losses) - before:
                losses[k] = losses[k] * weights.get(kind, 1.0)
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
        if speech_heldout_every and ((step + 1) % speech_heldout_every == 0 or step + 1 == steps):
            heard = stats["held-out speech clips"] = _heldout_speech(model, proc, heads)  # the last step's stays
            log.info("encoders %d/%d held-out speech clips %.0f%%", step + 1, steps, 100 * heard)
    model.zero_grad(set_to_none=True)
    return stats


def _heldout_speech(model: nn.Module, proc: Processor, heads: Heads, n: int = 96) -> float:
    """The share of `n` clips in the held-out generator's voices (the same clips each time: digits, questions and
    order numbers) that the CTC head transcribes whole."""
    from . import heldout

    stats: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        _speech(model.model, proc, heads, random.Random(99), n, {}, stats, wide_voices=True, voice=heldout.speak)
    model.train()
    return stats["speech clips"]


def _square_tokens(trunk, proc: Processor, images: list[Image.Image]) -> tuple[torch.Tensor, int]:
    """The pictures at the demo's square size, encoded: [B, grid * grid, D] and the grid."""
    side = int(proc.image.min_pixels**0.5)
    grid = side // (proc.image.patch_size * proc.image.merge_size)
    x = proc.image([_square(img, side) for img in images])
    return trunk.encode_vision(x["pixel_values"], x["image_grid_thw"]).view(len(images), grid * grid, -1), grid


def _tokens(trunk, proc: Processor, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The pictures as the processor sizes them (their own aspect ratios), encoded and padded: [B, N, D], the
    mask of real tokens [B, N] and each picture's token grid (rows, columns; its tokens row by row)."""
    x = proc.image(images)
    feats = trunk.encode_vision(x["pixel_values"], x["image_grid_thw"])
    per = feats.split(trunk.resampler_model.tokens_per_item(x["image_grid_thw"]))
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(f), dtype=torch.bool) for f in per], batch_first=True)
    m = proc.image.merge_size
    grids = [(int(h) // m, int(w) // m) for _, h, w in x["image_grid_thw"].tolist()]
    return nn.utils.rnn.pad_sequence(list(per), batch_first=True), mask, grids


def _shape_losses(heads: Heads, feats, mask, objects: list, losses: dict, stats: dict) -> None:
    """Per shape its colour and per colour its shape (0 = absent, -100 = twice: not asked), and the count."""
    n = len(objects)
    colour_of = torch.zeros(n, len(SHAPES), dtype=torch.long)
    shape_of = torch.zeros(n, len(COLOUR_NAMES), dtype=torch.long)
    for b, objs in enumerate(objects):
        shapes, colours = [s for _, s in objs], [c for c, _ in objs]
        for colour, shape in objs:
            i, j = SHAPES.index(shape), COLOUR_NAMES.index(colour)
            colour_of[b, i] = 1 + j if shapes.count(shape) == 1 else -100
            shape_of[b, j] = 1 + i if colours.count(colour) == 1 else -100
    counts = torch.tensor([len(objs) - 1 for objs in objects])
    mean = feats.mean(1) if mask is None else (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    c_log, s_log, n_log = heads.colour_of(feats, mask), heads.shape_of(feats, mask), heads.count(mean)
    losses["colour"] = F.cross_entropy(c_log.flatten(0, 1), colour_of.flatten(), ignore_index=-100)
    losses["shape"] = F.cross_entropy(s_log.flatten(0, 1), shape_of.flatten(), ignore_index=-100)
    losses["count"] = F.cross_entropy(n_log, counts)
    stats["colour"] = _accuracy(c_log[colour_of > 0], colour_of[colour_of > 0])
    stats["shape"] = _accuracy(s_log[shape_of > 0], shape_of[shape_of > 0])
    stats["count"] = _accuracy(n_log, counts)


def _first_pictures(trunk, proc, heads: Heads, rng, n: int, losses: dict, stats: dict) -> None:
    """Shape scenes of the first generation, with what lies under each token."""
    side = int(proc.image.min_pixels**0.5)
    images, objects, under = _scene_batch(rng, n, side // (proc.image.patch_size * proc.image.merge_size))
    feats, _ = _square_tokens(trunk, proc, images)
    _shape_losses(heads, feats, None, objects, losses, stats)
    t_log = heads.token(feats).split([1 + len(SHAPES), 1 + len(COLOUR_NAMES)], dim=-1)
    losses["tokens"] = sum(F.cross_entropy(lg.transpose(1, 2), under[:, k]) for k, lg in enumerate(t_log))


def _wide_pictures(trunk, proc, heads: Heads, rng, n: int, losses: dict, stats: dict) -> None:
    """The second generation's scenes, each at its own aspect ratio."""
    drawn = [wide.scene(rng) for _ in range(n)]
    feats, mask, _ = _tokens(trunk, proc, [img for img, _ in drawn])
    _shape_losses(heads, feats, mask, [objs for _, objs in drawn], losses, stats)


def _chart_losses(heads: Heads, feats, mask, drawn: list, labels: str, losses: dict, stats: dict) -> torch.Tensor:
    values = torch.tensor([[v.get(label, 0) for label in labels] for _, v in drawn])
    extremes = torch.tensor([[labels.index(f(v, key=v.get)) for f in (max, min)] for _, v in drawn])
    v_log, e_log = heads.value_of(feats, mask), heads.extreme(feats, mask)
    losses["bar"] = F.cross_entropy(v_log.flatten(0, 1), values.flatten())
    losses["extreme"] = F.cross_entropy(e_log.flatten(0, 1), extremes.flatten())
    stats["bar value"] = _accuracy(v_log[values > 0], values[values > 0])
    stats["tallest"] = _accuracy(e_log[:, 0], extremes[:, 0])
    stats["shortest"] = _accuracy(e_log[:, 1], extremes[:, 1])
    return values


def _first_charts(trunk, proc, heads: Heads, rng, n: int, losses: dict, stats: dict) -> None:
    """The first generation's charts (label k in the k-th fifth), with each token's column's value and label."""
    drawn = [bar_chart(rng) for _ in range(n)]
    feats, grid = _square_tokens(trunk, proc, [img for img, _ in drawn])
    values = _chart_losses(heads, feats, None, drawn, LABELS, losses, stats)
    columns = _column_targets(values, grid)
    k_log = heads.column(feats).split([10, len(LABELS)], dim=-1)
    losses["columns"] = sum(F.cross_entropy(lg.transpose(1, 2), columns[:, k]) for k, lg in enumerate(k_log))


def _wide_charts(trunk, proc, heads: Heads, rng, n: int, losses: dict, stats: dict) -> None:
    """The second generation's charts: 2-7 bars anywhere, vertical or horizontal, at their own aspect ratio; and
    per token, from where the chart drew each bar and name, the bar under it, that bar's value and the label name
    in it, so the encoder learns where a chart's bars and names are, whatever its layout."""
    layouts = [{} for _ in range(n)]
    drawn = [wide.chart(rng, layout=layout) for layout in layouts]
    feats, mask, grids = _tokens(trunk, proc, [img for img, _ in drawn])
    _chart_losses(heads, feats, mask, drawn, wide.LABELS, losses, stats)
    targets = torch.full((n, 3, feats.shape[1]), -100, dtype=torch.long)
    for b, ((_, values), layout, grid) in enumerate(zip(drawn, layouts, grids, strict=True)):
        targets[b, :, : grid[0] * grid[1]] = _chart_token_targets(layout, values, grid)
    sizes = [1 + len(wide.LABELS), 10, 1 + len(wide.LABELS)]
    logits = heads.chart_token(feats).split(sizes, dim=-1)
    losses["chart tokens"] = sum(F.cross_entropy(lg.transpose(1, 2), targets[:, k]) for k, lg in enumerate(logits))
    on_bar, on_name = targets[:, 0] > 0, targets[:, 2] > 0
    stats["bar tokens"] = _accuracy(logits[0][on_bar], targets[:, 0][on_bar])  # which bar (A-G) lies under it
    stats["bar token values"] = _accuracy(logits[1][on_bar], targets[:, 1][on_bar])  # that bar's value
    stats["name tokens"] = _accuracy(logits[2][on_name], targets[:, 2][on_name])  # the letter drawn in it


def _glyphs(trunk, proc, heads: Heads, rng, n: int, losses: dict, stats: dict) -> None:
    """Pages of letters and digits (`wide.glyph_page`): per token, the glyph whose centre it holds (0 = none)."""
    drawn = [wide.glyph_page(rng) for _ in range(n)]
    feats, _, grids = _tokens(trunk, proc, [img for img, _ in drawn])
    target = torch.full(feats.shape[:2], -100, dtype=torch.long)
    for b, ((_, where), (rows, cols)) in enumerate(zip(drawn, grids, strict=True)):
        target[b, : rows * cols] = 0
        for (x, y), g in where.items():
            r, c = _cell(x, y, (rows, cols))
            target[b, r * cols + c] = 1 + wide.GLYPHS.index(g)
    logits = heads.glyph(feats)
    losses["glyphs"] = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    on = target > 0
    stats["glyphs"] = _accuracy(logits[on], target[on])


def _chart_token_targets(layout: dict, values: dict[str, int], grid: tuple[int, int]) -> torch.Tensor:
    """[3, rows * cols]: per token (row by row) the bar covering most of it, or whose centre it holds (1 + its
    label's index; 0 = none), that bar's value (0 = none), and the label name whose centre is in it (1 + index;
    0 = none)."""
    rows, cols = grid
    y0 = torch.arange(rows, dtype=torch.float)[:, None] / rows
    x0 = torch.arange(cols, dtype=torch.float)[None, :] / cols
    best = torch.zeros(rows, cols)
    out = torch.zeros(3, rows, cols, dtype=torch.long)
    for label, (bx0, by0, bx1, by1) in layout["bars"].items():
        across = (torch.clamp(x0 + 1 / cols, max=bx1) - torch.clamp(x0, min=bx0)).clamp(min=0)
        down = (torch.clamp(y0 + 1 / rows, max=by1) - torch.clamp(y0, min=by0)).clamp(min=0)
        overlap = across * down
        more = overlap > best
        best = torch.where(more, overlap, best)
        out[0][more], out[1][more] = 1 + wide.LABELS.index(label), values[label]
    for label, (bx0, by0, bx1, by1) in layout["bars"].items():  # a bar narrower than a token still owns its centre
        r, c = _cell((bx0 + bx1) / 2, (by0 + by1) / 2, grid)
        out[0, r, c], out[1, r, c] = 1 + wide.LABELS.index(label), values[label]
    for label, (x, y) in layout["names"].items():
        r, c = _cell(x, y, grid)
        out[2, r, c] = 1 + wide.LABELS.index(label)
    return out.flatten(1)


def _cell(x: float, y: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, column) of the token at (x, y), fractions of the picture."""
    return min(max(int(y * grid[0]), 0), grid[0] - 1), min(max(int(x * grid[1]), 0), grid[1] - 1)


def _videos(trunk, proc, heads: Heads, rng, n: int, draw, losses: dict, stats: dict) -> None:
    """A clip's motion, colour and shape from the mean of its tokens."""
    videos = [draw(rng) for _ in range(n)]
    x = proc.video([v for v, *_ in videos])
    feats = trunk.encode_vision(x["pixel_values_videos"], x["video_grid_thw"])
    per_video = trunk.resampler_model.tokens_per_item(x["video_grid_thw"])
    logits = heads.video(torch.stack([f.mean(0) for f in feats.split(per_video)]))
    parts = logits.split([len(MOTIONS), len(COLOUR_NAMES), len(SHAPES)], dim=-1)
    targets = [torch.tensor([names.index(v[i]) for v in videos])
               for names, i in ((MOTIONS, 1), (COLOUR_NAMES, 2), (SHAPES, 3))]  # fmt: skip
    losses["video"] = sum(F.cross_entropy(p, t) for p, t in zip(parts, targets, strict=True))
    stats["direction"] = _accuracy(parts[0], targets[0])


def _cos(x: float) -> float:
    return math.cos(math.pi * min(x, 1.0))


def _speech(trunk, proc: Processor, heads: Heads, rng: random.Random, n: int, losses: dict, stats: dict,
            wide_voices: bool = False, voice=None) -> None:  # fmt: skip
    """CTC over the audio tokens of `n` fresh clips (spoken digits and spoken questions; with `wide_voices`, the
    second generation's voices and also the agent's voice messages; `voice`: another speaker for those texts)."""
    texts = []
    for _ in range(n):
        digits = " ".join(NUMBER_WORDS[rng.randint(0, 9)] for _ in range(rng.randint(1, 4)))
        if wide_voices and rng.random() < 0.3:
            order = " ".join(NUMBER_WORDS[rng.randint(0, 9)] for _ in range(rng.randint(3, 4)))
            texts.append(
                rng.choice(["please cancel order", "order", "this is about order", "my order is"]) + " " + order
            )
        elif rng.random() < 0.7:
            texts.append(digits)
        else:
            a, b = NUMBER_WORDS[rng.randint(0, 9)], NUMBER_WORDS[rng.randint(0, 9)]
            texts.append(f"what is {a} {rng.choice(list(SPOKEN_OPS))} {b}")
    say = voice or (wide.speak if wide_voices else speak)
    x = proc.audio([say(t, rng) for t in texts])
    feats = trunk.encode_audio(x["audio_values"], x["audio_lengths"])
    per = proc.audio.config.mel_frames_per_token
    lengths = x["audio_lengths"] // per
    logp = heads.words(feats).log_softmax(-1)
    padded = nn.utils.rnn.pad_sequence(list(logp.split(lengths.tolist())))  # [T, N, C]
    targets = [torch.tensor([1 + WORDS.index(w) for w in t.split()]) for t in texts]
    losses["speech"] = F.ctc_loss(padded, torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]),
                                  zero_infinity=True)  # fmt: skip
    right = 0
    for i, t in enumerate(targets):  # greedy CTC decode: collapse repeats, drop blanks
        best = padded[: lengths[i], i].argmax(-1).tolist()
        words = [w for k, w in enumerate(best) if w and (k == 0 or best[k - 1] != w)]
        right += words == t.tolist()
    stats["speech clips"] = right / n
