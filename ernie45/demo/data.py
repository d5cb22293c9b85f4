"""The demo's training data: an indexable stream of packed rows drawn fresh from the task generators.

Row i is made from its own seed, so the data order is fixed by (seed, i): a resumed run sees exactly the
rows it would have seen.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from ..processing.processor import Processor
from ..train.data import Sample, tokenize_chat
from .tasks import check_mix, draw

DEMO_IMAGE = {"min_pixels": 140 * 140, "max_pixels": 140 * 140}
DEMO_VIDEO = {"min_frames": 8, "max_frames": 8, "min_pixels": 84 * 84, "max_pixels": 84 * 84,
              "draw_timestamps": False}  # fmt: skip


def configure(proc: Processor, image_side: int = 140, video_side: int = 84) -> Processor:
    """The demo's media sizes: by default 140 px images (25 tokens: a 5 x 5 grid) and 8-frame 84 px videos
    (36 tokens); a recipe's `image_side` / `video_side` (multiples of 28: one token per 28 x 28 px) set others."""
    for side, name in ((image_side, "image_side"), (video_side, "video_side")):
        if side % 28 or side < 28:
            raise ValueError(f"data.demo.{name}: {side} is not a positive multiple of 28 (one token per 28 x 28 px)")
    for k, v in {**DEMO_IMAGE, "min_pixels": image_side**2, "max_pixels": image_side**2}.items():
        setattr(proc.image, k, v)
    for k, v in {**DEMO_VIDEO, "min_pixels": video_side**2, "max_pixels": video_side**2}.items():
        setattr(proc.video, k, v)
    return proc


def make_sample(proc: Processor, rng: random.Random, mix: dict | None = None, turns: int = 1,
                describe_last: bool = False) -> Sample:  # fmt: skip
    skill, messages, answer = draw(rng, mix, turns, describe_last)
    sample = tokenize_chat(proc, [*messages, {"role": "assistant", "content": answer}])
    sample.source = skill
    return sample


class DemoRows(Dataset):
    """`rows` packed rows of at most `budget` tokens, each drawn from seed (seed, index); media samples ask up to
    `turns` questions (a description last with `describe_last`)."""

    def __init__(self, proc: Processor, rows: int, budget: int, seed: int = 0, mix: dict | None = None,
                 turns: int = 1, describe_last: bool = False) -> None:  # fmt: skip
        self.proc, self.rows, self.budget, self.seed, self.mix, self.turns = proc, rows, budget, seed, mix, turns
        self.describe_last = describe_last
        if mix is not None:
            check_mix(mix)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> list[Sample]:
        rng = random.Random(self.seed * 1_000_003 + i)
        row, used = [], 0
        while True:
            s = make_sample(self.proc, rng, self.mix, self.turns, self.describe_last)
            if len(s) > self.budget:  # a long conversation that no row could hold: drawn again
                continue
            if used + len(s) > self.budget:
                return row or [s]
            row.append(s)
            used += len(s)
