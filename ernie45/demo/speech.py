"""The demo's speech: espeak-ng (a Debian program, called, never linked) in many accents, voices, speeds and
pitches, resampled to 16 kHz with gain and noise."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import wave
from functools import lru_cache

import numpy as np

from . import MissingDataSource

ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt2"]


@lru_cache(maxsize=1)
def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingDataSource("espeak-ng is needed to make the demo's speech data: apt-get install espeak-ng")
    return exe


def speak(text: str, rng: random.Random, rate: tuple[int, int] = (100, 250), noise: float = 0.03,
          voices: tuple[list[str], list[str]] = (ACCENTS, VARIANTS)) -> np.ndarray:  # fmt: skip
    """16 kHz float32 speech of `text` in a random accent, voice, speed and pitch, with gain and noise."""
    voice = rng.choice(voices[0]) + rng.choice(voices[1])
    cmd = [_espeak(), "-v", voice, "-s", str(rng.randint(*rate)), "-p", str(rng.randint(10, 90)), "--stdout", text]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(raw)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    n = int(len(pcm) * 16000 / rate)
    wave16 = np.interp(np.linspace(0, len(pcm) - 1, n), np.arange(len(pcm)), pcm).astype(np.float32)
    wave16 *= rng.uniform(0.2, 1.0)
    wave16 += rng.uniform(0.0, noise) * np.random.default_rng(rng.getrandbits(32)).standard_normal(n).astype(np.float32)
    return wave16
