"""Where the demo tasks' media come from: a `Generator` of pictures, charts, clips and speech. `TRAIN` is the
training generator (`wide`); `eval.HELDOUT` the held-out one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import wide


@dataclass(frozen=True)
class Generator:
    """Where a task's media come from: the training generator (`wide`) or the held-out one (`heldout`)."""

    scene: Callable
    chart: Callable
    video: Callable  # a clip as frames (or a file path) for the video questions
    speak: Callable
    clip: Callable | None = None  # a clip as frames, where `video` gives files (moderation draws on frames)
    mark: Callable | None = None  # draws the moderation policy's symbol on a frame


TRAIN = Generator(wide.scene, wide.chart, wide.video, wide.speak)
