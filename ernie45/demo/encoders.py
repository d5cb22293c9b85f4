"""Stage 0 of the demo recipe: the media encoders learn to see and hear before the trunk reads them.

Trained through the trunk alone, an encoder is taught by about one answer token per sample ("red" in "The
square is red."): the shipped model learned counting that way but never shape (chance) nor which way a
shape moves (it knew the axis, not the sign). Here each picture's, video's and clip's facts supervise the
vision and audio paths (encoder + resampler, exactly what the trunk will read) directly, through small heads
that are thrown away afterwards:

- shape scenes: per quadrant, which shape (or none) and which colour (or none), read from the mean of the
  quadrant's tokens by one head shared by all quadrants — so every token says what lies under it;
- bar charts: each label's value (0 = no such bar) from all tokens;
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
from .tasks import SPOKEN_OPS, speak

log = logging.getLogger("ernie45.train")
WORDS = (*NUMBER_WORDS, "what", "is", *SPOKEN_OPS)  # every word the demo's speech says
COLOUR_NAMES = tuple(COLOURS)
LABELS = "ABCDE"


class Heads(nn.Module):
    def __init__(self, width: int, image_tokens: int, audio: bool) -> None:
        super().__init__()
        self.quadrant = nn.Linear(width, 1 + len(SHAPES) + 1 + len(COLOUR_NAMES))
        self.chart = nn.Linear(width * image_tokens, len(LABELS) * 10)
        self.video = nn.Linear(width, len(MOTIONS) + len(COLOUR_NAMES) + len(SHAPES))
        self.words = nn.Linear(width, 1 + len(WORDS)) if audio else None  # 0 = CTC blank


def _quadrants(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, grid*grid, D] image tokens (row-major) -> [B, 4, D]: the mean of each quadrant, index 2 * y + x."""
    half = grid // 2
    x = feats.view(feats.shape[0], 2, half, 2, half, -1)  # (y, row, x, column)
    return x.mean(dim=(2, 4)).flatten(1, 2)


def _scene_batch(rng: random.Random, n: int):
    images, shape_t, colour_t = [], torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, 4, dtype=torch.long)
    for b in range(n):
        img, objects, cells = shape_scene(rng, cells=True)
        images.append(img)
        for (colour, shape), (i, j) in zip(objects, cells, strict=True):
            shape_t[b, 2 * j + i] = 1 + SHAPES.index(shape)
            colour_t[b, 2 * j + i] = 1 + COLOUR_NAMES.index(colour)
    return images, shape_t, colour_t


def _square(img: Image.Image, side: int) -> Image.Image:
    """The picture at exactly the demo's square size, as the processor would resize it (so every picture gets
    the same token grid: smart_resize's rounding sends a few source sizes one step up)."""
    return img.resize((side, side), Image.Resampling.BICUBIC)


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(-1) == target).float().mean())


def pretrain_encoders(model: nn.Module, proc: Processor, steps: int, batch: int = 16, lr: float = 1e-3,
                      seed: int = 0, log_every: int = 50) -> dict[str, float]:  # fmt: skip
    """Train the vision and audio paths of `model` in place for `steps` steps; returns the last accuracies."""
    trunk, c = model.model, model.config
    torch.manual_seed(seed)
    rng = random.Random(seed * 7_919 + 17)
    side = int(proc.image.min_pixels**0.5)
    grid = side // (proc.image.patch_size * proc.image.merge_size)
    audio = hasattr(trunk, "audio_tower")
    heads = Heads(c.hidden_size, grid * grid, audio)
    encoder = [p for n, p in trunk.named_parameters() if n.split(".")[0] in ENCODER_MODULES]
    opt = torch.optim.AdamW([*encoder, *heads.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + _cos(s / steps)))
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        losses, stats = {}, {}
        images, shape_t, colour_t = _scene_batch(rng, batch)
        x = proc.image([_square(img, side) for img in images])
        q = _quadrants(trunk.encode_vision(x["pixel_values"], x["image_grid_thw"]).view(batch, grid * grid, -1), grid)
        logits = heads.quadrant(q)
        s_log, c_log = logits[..., : 1 + len(SHAPES)], logits[..., 1 + len(SHAPES) :]
        losses["shape"] = F.cross_entropy(s_log.flatten(0, 1), shape_t.flatten())
        losses["colour"] = F.cross_entropy(c_log.flatten(0, 1), colour_t.flatten())
        present = shape_t > 0
        stats["shape"], stats["colour"] = _accuracy(s_log[present], shape_t[present]), _accuracy(c_log, colour_t)

        charts = [bar_chart(rng) for _ in range(batch // 2)]
        x = proc.image([_square(img, side) for img, _ in charts])
        values = torch.tensor([[v.get(label, 0) for label in LABELS] for _, v in charts])
        feats = trunk.encode_vision(x["pixel_values"], x["image_grid_thw"]).view(len(charts), -1)
        logits = heads.chart(feats).view(len(charts), len(LABELS), 10)
        losses["bar"] = F.cross_entropy(logits.flatten(0, 1), values.flatten())
        stats["bar value"] = _accuracy(logits[values > 0], values[values > 0])

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
        if (step + 1) % log_every == 0 or step + 1 == steps:
            eta = (time.perf_counter() - start) / (step + 1) * (steps - step - 1)
            log.info("encoders %d/%d loss %.3f %s (eta %.0fs)", step + 1, steps, loss.item(),
                     " ".join(f"{k} {v:.0%}" for k, v in stats.items()), eta)  # fmt: skip
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
