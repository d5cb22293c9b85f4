"""Video moderation: windows cut with the right timing from files, sound-only and silent inputs and a live pipe;
the flagged picture and tone land in their window; `ernie45 moderate` writes one schema-valid verdict per window."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import av
import jsonschema
import numpy as np
import pytest

from ernie45.jobs.moderate import Policy, windows


def _clip(seconds: float = 6.0, sound: bool = True, picture: bool = True, fmt: str = "mp4") -> bytes:
    """A 320x240 clip at 10 fps: grey, but red with a 440 Hz tone from 2 s to 4 s."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        vs = None
        if picture:
            vs = c.add_stream("mpeg4", rate=10)
            vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        a = None
        if sound:
            a = c.add_stream("aac" if fmt != "wav" else "pcm_s16le", rate=16000)
            a.layout = "mono"
        for i in range(int(seconds * 10) if picture else 0):
            red = 2 <= i / 10 < 4
            img = np.full((240, 320, 3), (220, 20, 20) if red else (128, 128, 128), np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        if sound:
            t = np.arange(int(16000 * seconds)) / 16000
            wave = (0.4 * np.sin(2 * np.pi * 440 * t) * ((t >= 2) & (t < 4))).astype(np.float32)
            fmt_in = "fltp" if fmt != "wav" else "s16"
            for s in range(0, wave.size, 1024):
                chunk = wave[None, s : s + 1024]
                data = chunk if fmt != "wav" else (chunk * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(data, format=fmt_in, layout="mono")
                frame.sample_rate, frame.pts = 16000, s
                for p in a.encode(frame):
                    c.mux(p)
        for stream in (vs, a):
            if stream is not None:
                for p in stream.encode():
                    c.mux(p)
    return buf.getvalue()


def test_windows_have_the_right_timing_frames_and_sound(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(_clip())
    ws = list(windows(path, length=2.0, fps=2.0))
    assert [(w.start, round(w.end)) for w in ws] == [(0.0, 2), (2.0, 4), (4.0, 6)]
    assert [len(w.frames) for w in ws] == [4, 4, 4]
    red = [float(np.asarray(w.frames[1])[..., 0].mean() - np.asarray(w.frames[1])[..., 1].mean()) for w in ws]
    loud = [float(np.abs(w.audio).max()) for w in ws]
    assert red[1] > 100 and red[0] < 20 and red[2] < 20  # the red picture is in the second window only
    assert loud[1] > 0.2 and loud[0] < 0.05 and loud[2] < 0.05  # and so is the tone
    overlapping = list(windows(path, length=2.0, stride=1.0))
    assert [w.start for w in overlapping][:5] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_silent_video_sound_only_and_a_live_pipe(tmp_path):
    silent = list(windows(io.BytesIO(_clip(sound=False)), length=3.0))
    assert len(silent) == 2 and all(w.audio is None and w.frames for w in silent)
    sound_only = list(windows(io.BytesIO(_clip(picture=False, fmt="wav")), length=3.0))
    assert len(sound_only) == 2 and all(not w.frames and w.audio.size == 48000 for w in sound_only)
    data = _clip(fmt="mpegts")
    read, write = os.pipe()

    def feed() -> None:  # the stream arrives in pieces, as a live source does
        with os.fdopen(write, "wb") as f:
            for i in range(0, len(data), 4096):
                f.write(data[i : i + 4096])
                f.flush()

    threading.Thread(target=feed, daemon=True).start()
    with os.fdopen(read, "rb") as f:
        live = list(windows(f, length=2.0, format="mpegts"))
    assert [round(w.start) for w in live] == [0, 2, 4] and all(w.frames and w.audio.size for w in live)
    with pytest.raises(ValueError, match="not a readable video"):
        list(windows(io.BytesIO(b"not a video at all")))


def test_the_moderate_command_writes_a_valid_verdict_per_window(tmp_path):
    video, policy = tmp_path / "clip.mp4", tmp_path / "policy.yaml"
    video.write_bytes(_clip(seconds=4.0))
    policy.write_text("categories:\n  red_screen: the picture is red\n  tone: a beep or tone is heard\n")
    out = tmp_path / "verdicts.jsonl"
    run = subprocess.run([sys.executable, "-m", "ernie45", "moderate", str(video), "--policy", str(policy),
                          "--window", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    schema = {"type": "object", "required": ["start", "end", "labels", "evidence", "confidence"],
              "properties": {"labels": {"type": "array", "items": {"enum": ["red_screen", "tone"]}},
                             "evidence": {"type": "string"}, "confidence": {"minimum": 0, "maximum": 1},
                             "start": {"type": "number"}, "end": {"type": "number"}}}  # fmt: skip
    for line in lines:
        jsonschema.validate(line, schema)
    assert [(x["start"], round(x["end"])) for x in lines] == [(0.0, 2), (2.0, 4)]
    assert "window 2: 2.0-4.0 s" in run.stderr and '"summary"' in run.stderr
    bad = subprocess.run([sys.executable, "-m", "ernie45", "moderate", str(video), "--policy", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_policy_needs_categories():
    with pytest.raises(ValueError, match="category"):
        Policy({})
