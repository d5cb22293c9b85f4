"""The audio path: a Whisper-style encoder and a resampler to trunk-width audio tokens (12.5 per second).

log-mel [frames, 128] -> conv1d k3 + GELU -> conv1d k3 stride 2 + GELU (50 frames/s) -> sinusoidal
positions -> pre-LN bidirectional transformer blocks whose attention is bounded to 30 s windows (one
FlashMask document mask over all items and windows) -> LayerNorm -> merge 4 frames -> MLP -> RMSNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FlashMask, flashmask_attention
from ..config import AudioConfig
from .layers import RMSNorm


def sinusoids(length: int, channels: int, device=None) -> torch.Tensor:
    """Whisper's fixed positions: sin | cos over log-spaced timescales up to 10000."""
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, device=device, dtype=torch.float32))
    t = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


def window_mask(lengths: list[int], window: int) -> FlashMask | None:
    """Bidirectional attention within each item's consecutive `window`-frame windows."""
    spans = [min(window, n - s) for n in lengths for s in range(0, n, window)]
    if len(spans) == 1:
        return None
    sizes = torch.tensor(spans)
    ends = sizes.cumsum(0)
    lts, ute = ends.repeat_interleave(sizes), (ends - sizes).repeat_interleave(sizes)
    return FlashMask(torch.stack([lts, ute], -1).to(torch.int32)[None, None], causal=False)


class AudioAttention(nn.Module):
    def __init__(self, c: AudioConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: FlashMask | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).permute(1, 2, 0, 3)[:, None]  # each [1, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v) if mask is None else flashmask_attention(q, k, v, mask)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class AudioBlock(nn.Module):
    def __init__(self, c: AudioConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = AudioAttention(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: FlashMask | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class AudioEncoder(nn.Module):
    """audio_values [frames, n_mels] + audio_lengths [items] -> encoder frames [frames / 2, hidden]."""

    def __init__(self, c: AudioConfig) -> None:
        super().__init__()
        self.config = c
        self.conv1 = nn.Conv1d(c.n_mels, c.hidden_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.hidden_size, c.hidden_size, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList([AudioBlock(c) for _ in range(c.num_layers)])
        self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        dtype = self.conv1.weight.dtype
        frames = []
        for item in mels.split(lengths.tolist()):  # convolutions never cross items
            h = F.gelu(self.conv1(item.T[None].to(dtype)))
            h = F.gelu(self.conv2(h))[0].T
            frames.append(h + sinusoids(h.shape[0], h.shape[1], h.device).to(dtype))
        x = torch.cat(frames)
        frames_per_s = self.config.sample_rate / self.config.hop_length / 2
        mask = window_mask([f.shape[0] for f in frames], int(self.config.window_seconds * frames_per_s))
        if mask is not None:
            mask = mask.to(x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)


class AudioResampler(nn.Module):
    """Merge `merge` consecutive encoder frames (never across items: each is a whole number of tokens)."""

    def __init__(self, c: AudioConfig, text_hidden: int, rms_eps: float) -> None:
        super().__init__()
        self.merge = c.merge
        self.fc1 = nn.Linear(c.hidden_size * c.merge, text_hidden)
        self.fc2 = nn.Linear(text_hidden, text_hidden)
        self.after_norm = RMSNorm(text_hidden, rms_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1] * self.merge)
        return self.after_norm(self.fc2(F.gelu(self.fc1(x))))
