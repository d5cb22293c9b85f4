"""Audio -> model inputs: decode (PyAV: WAV, FLAC, OGG, MP3, a video's sound track) to 16 kHz mono, then a
128-bin log-mel spectrogram with `torch.stft`.

Log-mel (Whisper's recipe): Hann window of n_fft = 400 samples (25 ms), hop 160 (10 ms, 100 frames/s),
power spectrum, Slaney-scale mel filters (0-8 kHz, area-normalised), log10 clamped at 1e-10, floor at
(max - 8), then (x + 4) / 4. Each item is padded to a whole number of tokens (8 mel frames = 80 ms).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..config import AudioConfig
from .media import MediaInput, check_cancelled, describe, read_bytes


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), f)


@lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, area-normalised (Slaney)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(wave: torch.Tensor, config: AudioConfig | None = None) -> torch.Tensor:
    """[samples] float -> [frames, n_mels] (frames = samples // hop)."""
    config = config or AudioConfig()
    window = torch.hann_window(config.n_fft)
    spec = torch.stft(wave.float(), config.n_fft, config.hop_length, window=window, return_complex=True)
    power = spec[:, :-1].abs() ** 2  # drop the last frame: samples // hop frames, as Whisper
    mel = mel_filters(config.sample_rate, config.n_fft, config.n_mels) @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0) if logs.numel() else logs
    return ((logs + 4.0) / 4.0).T.contiguous()


def decode_audio(source: MediaInput, sample_rate: int = 16000, max_seconds: float | None = None,
                 silent_ok: bool = False) -> torch.Tensor:  # fmt: skip
    """Any audio file, bytes, data: URL or 1-D array (taken as `sample_rate` Hz) -> float32 mono samples.
    silent_ok: a file without a sound track (a silent video) gives no samples instead of an error."""
    import av

    if isinstance(source, np.ndarray | torch.Tensor):
        wave = torch.as_tensor(np.asarray(source, dtype=np.float32))
        if wave.dim() == 2:
            wave = wave.mean(0 if wave.shape[0] < wave.shape[1] else 1)
        if wave.dim() != 1:
            raise ValueError(f"{describe(source)}: expected a 1-D waveform (or [channels, samples])")
        return _check_length(wave, sample_rate, max_seconds, source)
    data = read_bytes(source) if not isinstance(source, Path) or source.is_file() else read_bytes(str(source))
    chunks: list[np.ndarray] = []
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
            if not container.streams.audio:
                if silent_ok:
                    return torch.zeros(0)
                raise ValueError("it has no audio stream")
            claimed = container.duration / 1_000_000 if container.duration else None
            if max_seconds is not None and claimed is not None and claimed > max_seconds + 1:  # from the header
                raise ValueError(f"it is {claimed:.0f} s long, over the {max_seconds:g} s limit; cut it or raise "
                                 "max_seconds")  # fmt: skip
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            got = 0
            for frame in container.decode(container.streams.audio[0]):
                check_cancelled()
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    got += chunks[-1].size
                if limit is not None and got > limit:
                    raise ValueError(f"it is longer than the {max_seconds:g} s limit; cut it or raise max_seconds")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except ValueError as e:
        raise ValueError(f"{describe(source)}: not readable audio ({e})") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{describe(source)}: not readable audio ({e})") from None
    wave = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
    return _check_length(wave, sample_rate, max_seconds, source)


def _check_length(wave: torch.Tensor, rate: int, max_seconds: float | None, source) -> torch.Tensor:
    if wave.numel() == 0:
        raise ValueError(f"{describe(source)}: the audio is empty (no samples)")
    if max_seconds is not None and wave.numel() > max_seconds * rate:
        seconds = wave.numel() / rate
        raise ValueError(f"{describe(source)}: {seconds:.1f} s is longer than the {max_seconds:g} s limit")
    return wave.float()


@dataclass
class AudioProcessor:
    """Turns audio into ``audio_values [frames, n_mels]`` (items concatenated) and ``audio_lengths [items]``."""

    config: AudioConfig = field(default_factory=AudioConfig)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """[samples] -> [frames, n_mels], padded with silence to a whole number of tokens."""
        per_token = self.config.mel_frames_per_token * self.config.hop_length
        padded = max(per_token, math.ceil(wave.numel() / per_token) * per_token)
        return log_mel(torch.nn.functional.pad(wave, (0, padded - wave.numel())), self.config)

    def __call__(self, audios: list[MediaInput] | MediaInput) -> dict[str, torch.Tensor]:
        audios = audios if isinstance(audios, list) else [audios]
        c = self.config
        mels = [self.features(decode_audio(a, c.sample_rate, c.max_seconds)) for a in audios]
        return self.collate(mels)

    def collate(self, mels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "audio_values": torch.cat(mels),
            "audio_lengths": torch.tensor([m.shape[0] for m in mels], dtype=torch.long),
        }

    def num_tokens(self, mel_frames: int) -> int:
        return mel_frames // self.config.mel_frames_per_token
