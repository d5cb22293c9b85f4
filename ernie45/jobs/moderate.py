"""Video moderation: a video (a file, a growing file, a pipe, any stream PyAV opens) cut into windows, each
window's frames and sound asked against a policy's categories, the answer forced into a JSON verdict by
constrained decoding, one verdict per window as soon as the window is done.

The stream is read once, in order: frames are sampled at `fps` and shrunk as they arrive, the sound is resampled
to the audio encoder's rate, and only what the next windows need is kept, so memory does not grow with the
video's length and live input is screened as it comes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..engine import LLM, SamplingParams
from ..engine.structured import StructuredOutputs

INSTRUCTIONS = ("You screen video segments against a content policy. For the segment you are given (its pictures "
                "and its sound), list the policy categories it shows or says, quote the evidence briefly, and give "
                "your confidence from 0 to 100.")  # fmt: skip


@dataclass
class Policy:
    """Categories to screen for (name -> what it covers) and optional extra instructions."""

    categories: dict[str, str]
    instructions: str = ""

    def __post_init__(self) -> None:
        if not self.categories or not all(isinstance(k, str) and k for k in self.categories):
            raise ValueError("a policy needs at least one category: {categories: {name: description, ...}}")

    def schema(self) -> dict:
        """The verdict the model must write (start and end are added from the window itself)."""
        return {"type": "object", "additionalProperties": False, "required": ["labels", "evidence", "confidence"],
                "properties": {"labels": {"type": "array", "items": {"enum": list(self.categories)},
                                          "maxItems": len(self.categories)},
                               "evidence": {"type": "string", "maxLength": 80},
                               "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}}  # fmt: skip

    def prompt(self) -> str:
        lines = [f"- {name}: {text}" for name, text in self.categories.items()]
        return "\n".join([INSTRUCTIONS, self.instructions, "Categories:", *lines]).replace("\n\n", "\n")


def load_policy(path: str | Path) -> Policy:
    """A policy from YAML or JSON: {categories: {name: description, ...}, instructions: "..."}."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: not a readable policy file ({e})") from None
    return parse_policy(text, str(path))


def parse_policy(text: str, where: str = "policy") -> Policy:
    """A policy from YAML or JSON text: {categories: {name: description}, instructions: ...}, or the categories'
    mapping alone (lines of `name: what it covers`)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not readable YAML or JSON ({e})") from None
    if isinstance(data, dict) and "categories" not in data and all(isinstance(v, str) for v in data.values()):
        data = {"categories": data}
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise ValueError(f"{where}: a policy is {{categories: {{name: description, ...}}, instructions: ...}}")
    return Policy({str(k): str(v) for k, v in data["categories"].items()}, str(data.get("instructions") or ""))


@dataclass
class Window:
    start: float
    end: float
    frames: list[Image.Image] = field(default_factory=list)
    audio: np.ndarray | None = None


def windows(
    source: Any, length: float = 4.0, stride: float | None = None, fps: float = 2.0, sample_rate: int = 16000,
    max_pixels: int = 200_000, format: str | None = None,
) -> Iterator[Window]:  # fmt: skip
    """The windows [start, start + length) every `stride` seconds of a video, as the stream reaches each one's
    end: its frames sampled at `fps` (each shrunk to at most `max_pixels`) and its sound, mono at `sample_rate`."""
    import av

    stride = stride or length
    if length <= 0 or stride <= 0 or fps <= 0:
        raise ValueError("window length, stride and fps must be positive")
    try:
        container = av.open(str(source) if isinstance(source, Path) else source, format=format)
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{source}: not a readable video ({e})") from None
    with container:
        video = container.streams.video[0] if container.streams.video else None
        sound = container.streams.audio[0] if container.streams.audio else None
        if video is None and sound is None:
            raise ValueError(f"{source}: no video or audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) if sound else None
        frames: list[tuple[float, Image.Image]] = []
        samples, sample_base = np.zeros(0, np.float32), 0  # samples[0] is sample number sample_base
        next_frame, start = 0.0, 0.0
        reached = {s: 0.0 for s in (video, sound) if s is not None}

        def window(start: float) -> Window:
            end = start + length
            w = Window(start, end, [img for t, img in frames if start <= t < end])
            if sound is not None:
                lo, hi = int(start * sample_rate) - sample_base, int(end * sample_rate) - sample_base
                w.audio = samples[max(lo, 0) : max(hi, 0)].copy()
            return w

        try:
            for packet in container.demux([s for s in (video, sound) if s is not None]):
                for frame in packet.decode():
                    t = float(frame.pts * frame.time_base) if frame.pts is not None else reached[packet.stream]
                    if packet.stream is video:
                        if t + 1e-6 >= next_frame:
                            img = frame.to_image().convert("RGB")
                            scale = (max_pixels / (img.width * img.height)) ** 0.5
                            if scale < 1:
                                img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
                            frames.append((t, img))
                            next_frame += 1.0 / fps
                            while next_frame <= t:
                                next_frame += 1.0 / fps
                        reached[video] = t + float(frame.time_base * (frame.duration or 0))
                    else:
                        for out in resampler.resample(frame):
                            samples = np.concatenate([samples, out.to_ndarray().reshape(-1)])
                        reached[sound] = (sample_base + samples.size) / sample_rate
                while min(reached.values()) >= start + length:  # every stream has passed this window's end
                    yield window(start)
                    start += stride
                    frames = [(t, img) for t, img in frames if t >= start]
                    drop = int(start * sample_rate) - sample_base
                    if drop > 0:
                        samples, sample_base = samples[drop:], sample_base + drop
        except av.error.FFmpegError as e:
            raise ValueError(f"{source}: the stream broke off ({e})") from None
        end = max(reached.values())
        while end - start >= min(0.5, length / 4):  # the last, shorter windows (not a codec's padding)
            w = window(start)
            w.end = min(w.end, end)
            if w.frames or (w.audio is not None and w.audio.size):
                yield w
            start += stride


def moderate(source: Any, policy: Policy, llm: LLM | None = None, *, length: float = 4.0,
             stride: float | None = None, fps: float = 2.0, format: str | None = None,
             max_tokens: int = 200) -> Iterator[dict]:  # fmt: skip
    """One verdict per window, as each window is done: {"start", "end", "labels", "evidence", "confidence" (0-1),
    "behind": seconds behind real time when the window was done (for live input)}."""
    llm = llm or LLM()
    proc = llm.processor
    if not proc.multimodal:
        raise ValueError("moderation needs a model that sees pictures (a VL or omni checkpoint)")
    schema = policy.schema()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=StructuredOutputs(json=schema))
    rate = proc.audio.config.sample_rate if proc.hears else 16000
    began = time.perf_counter()
    for w in windows(source, length, stride, fps, rate, max_pixels=proc.video.max_pixels, format=format):
        answer = llm.chat(window_messages(w, policy, proc.hears, rate), params)[0]
        yield verdict(w, answer.text, time.perf_counter() - began)


def window_messages(w: Window, policy: Policy, hears: bool, rate: int) -> list[dict]:
    """The chat that asks one window's frames (and sound, for a model that hears) against the policy."""
    parts: list[dict] = []
    if w.frames:
        parts.append({"type": "video", "video": w.frames if len(w.frames) > 1 else w.frames * 2})
    if hears and w.audio is not None and w.audio.size >= rate // 10:
        parts.append({"type": "audio", "audio": w.audio})
    parts.append({"type": "text", "text": f"Segment {w.start:.1f}-{w.end:.1f} s. Which categories apply?"})
    return [{"role": "system", "content": policy.prompt()}, {"role": "user", "content": parts}]


def verdict(w: Window, text: str, elapsed: float) -> dict:
    """A window's answer as its verdict; `elapsed`: seconds since the screening began (for `behind`)."""
    try:
        said = json.loads(text)
    except json.JSONDecodeError:  # the answer ran out of tokens before the JSON closed
        said = {"labels": [], "evidence": "", "confidence": 0, "error": f"unfinished verdict: {text!r}"}
    labels = list(dict.fromkeys(said.get("labels", [])))  # each category once
    return {"start": round(w.start, 3), "end": round(w.end, 3), "labels": labels,
            "evidence": said.get("evidence", ""), "confidence": said.get("confidence", 0) / 100,
            "behind": round(max(0.0, elapsed - w.end), 3),
            **({"error": said["error"]} if "error" in said else {})}  # fmt: skip


def summary(verdicts: list[dict], policy: Policy) -> dict:
    """Flagged segments and per-category totals (segments and seconds)."""
    flagged = [v for v in verdicts if v["labels"]]
    totals = {c: {"segments": 0, "seconds": 0.0} for c in policy.categories}
    for v in flagged:
        for label in v["labels"]:
            totals[label]["segments"] += 1
            totals[label]["seconds"] = round(totals[label]["seconds"] + v["end"] - v["start"], 3)
    return {"windows": len(verdicts), "flagged": [{"start": v["start"], "end": v["end"], "labels": v["labels"]}
                                                  for v in flagged], "categories": totals}  # fmt: skip
