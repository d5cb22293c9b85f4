"""Videos -> model inputs (docs/architecture.md §4): PyAV decoding, fps=2 sampling of 16-180 frames from the middle of
equal segments, a timestamp drawn on each frame before resizing, an odd count padded by repeating the
last frame, then the image pipeline per frame.

The timestamp font is Roboto Regular from the ``font-roboto`` package (Apache-2.0), the font the
original processor uses; Pillow's built-in font is the fallback.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .image import ImageProcessor, smart_resize
from .media import MAX_IMAGE_PIXELS, MediaInput, check_cancelled, describe, load_image, read_bytes

MAX_DECODED_FRAMES = 200_000  # a stream claiming more is refused rather than decoded for minutes


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import font_roboto

        return ImageFont.truetype(font_roboto.Roboto, size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def timestamp_text(seconds: float) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"time: {int(h):02d}:{int(m):02d}:{s:05.2f}"


def draw_timestamp(img: Image.Image, seconds: float) -> Image.Image:
    """Black text with a white stroke at the top-left, sized 10% of the shorter side."""
    size = max(1, int(0.1 * min(img.size)))
    out = img.copy()
    ImageDraw.Draw(out).text(
        (0, 0),
        timestamp_text(seconds),
        font=_font(size),
        fill=(0, 0, 0),
        stroke_width=int(0.1 * size),
        stroke_fill=(255, 255, 255),
    )
    return out


def sample_indices(total: int, duration: float, fps: float, min_frames: int, max_frames: int) -> list[int]:
    """Frame indices at the middle of `target` equal segments, target = duration * fps within the limits."""
    target = min(max(int(duration * fps), min_frames), max_frames)
    return [min(int((i + 0.5) * total / target), total - 1) for i in range(target)]


@dataclass
class VideoProcessor:
    """Turns videos into ``pixel_values_videos [T*h*w, 3*14*14]`` and ``video_grid_thw [n, 3]``."""

    fps: float = 2.0
    min_frames: int = 16
    max_frames: int = 180
    min_pixels: int = 299 * 28 * 28
    max_pixels: int = 1196 * 28 * 28
    temporal_merge_size: int = 2
    draw_timestamps: bool = True
    image: ImageProcessor = field(default_factory=ImageProcessor)
    max_input_pixels: int = MAX_IMAGE_PIXELS  # a stream whose frames are larger is refused from its header
    max_total_pixels: int | None = None  # frames x pixels after resizing (`ernie45 serve`: what its context holds)

    def load(self, source: MediaInput) -> tuple[np.ndarray, list[int], list[float]]:
        """A video -> (patches, grid [T, h, w], timestamps). A file is read one frame at a time: each sampled frame
        is stamped and resized to the target size as it is decoded, so memory holds one full-size frame and the
        small ones. Within `max_total_pixels` the frame count, then the frame size, shrink to fit."""
        if isinstance(source, np.ndarray) and source.ndim == 4 or isinstance(source, (list, tuple)):
            return self.encode_frames(*self.decode(source), source)
        frames, seconds = self._read(source)
        per_frame = [self.image.frame_patches(f) for f in frames]
        return np.concatenate([p for p, _, _ in per_frame]), [len(frames), per_frame[0][1], per_frame[0][2]], seconds

    def _plan(self, total: int, duration: float, height: int, width: int) -> tuple[list[int], int, int]:
        """The frame indices to sample and the size (h, w) each frame is resized to, within the budgets."""
        factor = self.image.patch_size * self.image.merge_size
        min_frames, max_frames = self.min_frames, self.max_frames
        min_pixels, max_pixels = self.min_pixels, self.max_pixels
        budget = self.max_total_pixels
        if budget is not None:
            most = max(self.temporal_merge_size, budget // max(min_pixels, factor * factor))
            most -= most % self.temporal_merge_size
            min_frames, max_frames = min(min_frames, most), min(max_frames, most)
        wanted = sample_indices(total, duration, self.fps, min_frames, max_frames)
        if budget is not None:
            count = len(wanted) + len(wanted) % self.temporal_merge_size
            max_pixels = max(factor * factor, min(max_pixels, budget // count))
            min_pixels = min(min_pixels, max_pixels)
        h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        if budget is not None and (len(wanted) + len(wanted) % 2) * h * w > budget:  # raised to min_pixels: too big
            h, w = smart_resize(height, width, factor, factor * factor, max_pixels)
        return wanted, h, w

    def _read(self, source: MediaInput) -> tuple[list[Image.Image], list[float]]:
        """Sampled frames, stamped and resized as they are decoded (see `load`); an odd count repeats the last."""
        frames, seconds = self._sampled(source, prepare=True)
        if len(frames) % self.temporal_merge_size:
            frames.append(frames[-1])
            seconds.append(seconds[-1])
        return frames, seconds

    def decode(self, source: MediaInput) -> tuple[list[Image.Image], list[float]]:
        """The sampled frames (RGB, as decoded) of a video file, bytes, data: URL or frame list, and their
        timestamps in seconds."""
        if isinstance(source, np.ndarray) and source.ndim == 4:
            source = list(source)
        if isinstance(source, (list, tuple)):  # already decoded frames, taken as sampled at `fps`
            frames = [f if isinstance(f, Image.Image) else load_image(f) for f in source]
            return [f.convert("RGB") for f in frames], [i / self.fps for i in range(len(frames))]
        return self._sampled(source, prepare=False)

    def _sampled(self, source: MediaInput, prepare: bool) -> tuple[list[Image.Image], list[float]]:
        """The sampled frames of a file and their timestamps; prepare: each one stamped and resized to the planned
        size as it is decoded (`_plan`), else as decoded. Frames over `max_input_pixels` are refused unread."""
        import av

        data = read_bytes(source) if not isinstance(source, Path) or source.is_file() else read_bytes(str(source))
        try:
            with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
                if not container.streams.video:
                    raise ValueError("it has no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
                if width * height > self.max_input_pixels:
                    raise ValueError(f"its frames are {width}x{height}, over the {self.max_input_pixels:,} pixel limit")
                rate = float(stream.average_rate or stream.guessed_rate or 25)
                duration = _duration(container, stream)
                total = stream.frames or max(1, round(duration * rate))
                if total > MAX_DECODED_FRAMES:
                    raise ValueError(f"it claims {total} frames, over the {MAX_DECODED_FRAMES} limit")
                if prepare:
                    wanted, h, w = self._plan(total, duration, height, width)
                else:
                    wanted = sample_indices(total, duration, self.fps, self.min_frames, self.max_frames)
                keep = set(wanted)
                done: dict[int, Image.Image] = {}
                for i, frame in enumerate(container.decode(stream)):
                    check_cancelled()
                    if i > MAX_DECODED_FRAMES:
                        raise ValueError("too many frames")
                    if i in keep:
                        img = frame.to_image().convert("RGB")
                        if prepare:
                            if self.draw_timestamps:
                                img = draw_timestamp(img, i * duration / total)
                            img = img.resize((w, h), Image.Resampling.BICUBIC)
                        done[i] = img
                    if i >= wanted[-1]:
                        break
        except ValueError as e:
            raise ValueError(f"{describe(source)}: not a readable video ({e})") from None
        except (av.error.FFmpegError, OSError) as e:
            raise ValueError(f"{describe(source)}: not a readable video ({e})") from None
        if not done:
            raise ValueError(f"{describe(source)}: not a readable video (no frame could be decoded)")
        fallback = done[max(done)]
        frames = [done.get(i, fallback) for i in wanted]  # a stream shorter than announced repeats its end
        return frames, [i * duration / total for i in wanted]

    def encode_frames(self, frames: list[Image.Image], seconds: list[float], source=None):
        """Decoded frames -> (patches [T*h*w, 3*14*14] numpy, grid [T, h, w], timestamps of the T frames)."""
        frames, seconds = list(frames), list(seconds)
        if self.draw_timestamps:
            frames = [draw_timestamp(f, s) for f, s in zip(frames, seconds, strict=True)]
        if len(frames) % self.temporal_merge_size:
            frames.append(frames[-1])  # odd count: repeat the last frame
            seconds.append(seconds[-1])
        factor = self.image.patch_size * self.image.merge_size
        try:
            h, w = smart_resize(frames[0].height, frames[0].width, factor, self.min_pixels, self.max_pixels)
        except ValueError as e:
            raise ValueError(f"{describe(source)}: {e}") from None
        per_frame = [self.image.frame_patches(f.resize((w, h), Image.Resampling.BICUBIC)) for f in frames]
        grid = [len(frames), per_frame[0][1], per_frame[0][2]]
        return np.concatenate([p for p, _, _ in per_frame]), grid, seconds

    def __call__(self, videos: list[MediaInput] | MediaInput) -> dict[str, torch.Tensor]:
        videos = videos if isinstance(videos, list) and not _is_frame_list(videos) else [videos]
        patches, grids = [], []
        for source in videos:
            p, grid, _ = self.load(source)
            patches.append(p)
            grids.append(grid)
        return {
            "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    def num_tokens(self, grid_thw: list[int]) -> int:
        """Placeholder tokens a video of this grid takes in the prompt."""
        return grid_thw[0] * grid_thw[1] * grid_thw[2] // (self.image.merge_size**2 * self.temporal_merge_size)


def _is_frame_list(x: list) -> bool:
    return bool(x) and all(isinstance(f, Image.Image) or (isinstance(f, np.ndarray) and f.ndim <= 3) for f in x)


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    if stream.frames and stream.average_rate:
        return stream.frames / float(stream.average_rate)
    raise ValueError("its duration is unknown")
