"""The vision path (docs/architecture.md §3): a DFNRope ViT over 14x14 patches and the spatial-temporal resampler.

Patches arrive flattened channel-major (3*14*14) in 2x2 block-major order, so the 4 patches of one
merge window are consecutive; every image or video frame attends only to itself (one batched call
with a per-frame block mask). The resampler merges 2x2 patches, then frame pairs, into text-width tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FlashMask, flashmask_attention
from ..config import VisionConfig
from .layers import RMSNorm


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) grid coordinates [N, 2] of every patch, in the processor's 2x2 block-major order."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hw = torch.stack([hh.reshape(block).transpose(1, 2).flatten(), ww.reshape(block).transpose(1, 2).flatten()])
        out.append(hw.T.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def frame_mask(grid_thw: torch.Tensor) -> FlashMask | None:
    """Bidirectional attention inside each image or video frame, as a FlashMask document mask (O(N))."""
    per_frame = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    if len(per_frame) == 1:
        return None
    ends = per_frame.cumsum(0)
    lts = ends.repeat_interleave(per_frame)
    ute = (ends - per_frame).repeat_interleave(per_frame)
    return FlashMask(torch.stack([lts, ute], -1).to(torch.int32)[None, None], causal=False)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: FlashMask | None):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).permute(1, 2, 0, 3)  # each [heads, N, D]
        cos, sin = rope
        # NeoX half-split, in fp32 (docs/architecture.md, pitfall 8)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        if mask is None:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        else:  # one call for all frames; the mask keeps each frame to itself
            out = flashmask_attention(q[None], k[None], v[None], mask)[0]
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, rope, mask):
        x = x + self.attn(self.norm1(x), rope, mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(c.in_channels * c.patch_size**2, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


class VisionTransformer(nn.Module):
    """pixel patches [N, 3*14*14] + grid_thw [items, 3] -> patch features [N, hidden]."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList([VisionBlock(c) for _ in range(c.depth)])
        self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def rope(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        quarter = c.head_dim // 2
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter)
        pos = patch_positions(grid_thw, c.spatial_merge_size).float()  # [N, 2] = (h, w)
        angles = (pos[:, :, None] * inv_freq.to(pos.device)).flatten(1)  # [h freqs | w freqs]
        angles = torch.cat([angles, angles], dim=-1)  # duplicated to head_dim (half-split rotation)
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        rope = self.rope(grid_thw)
        mask = frame_mask(grid_thw)
        for block in self.blocks:
            x = block(x, rope, mask)
        return self.ln(x)


class ResamplerMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, docs/architecture.md pitfall 9


class Resampler(nn.Module):
    """2x2 spatial merge, [even frame || odd frame] temporal merge (an image pairs with itself), projection."""

    def __init__(self, c: VisionConfig, text_hidden: int, rms_eps: float) -> None:
        super().__init__()
        self.merge, self.t_merge = c.spatial_merge_size, c.temporal_merge_size
        spatial = c.hidden_size * self.merge**2
        self.spatial_linear = ResamplerMLP(spatial, spatial, c.layer_norm_eps)
        self.temporal_linear = ResamplerMLP(spatial * self.t_merge, spatial, c.layer_norm_eps)
        self.mlp = nn.Linear(spatial, text_hidden)
        self.after_norm = RMSNorm(text_hidden, rms_eps)

    def pair_index(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the even and the odd frame of every frame pair, item by item."""
        even, odd, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
            if t > 1 and t % self.t_merge:
                raise ValueError(f"a video needs an even number of frames, got {t} (the processor pads odd counts)")
            hw = h * w // self.merge**2
            frames = torch.arange(t).view(-1, 1) * hw + torch.arange(hw) + offset
            even.append(frames[0::2].flatten())
            odd.append((frames[1::2] if t > 1 else frames).flatten())
            offset += t * hw
        return torch.cat(even).to(grid_thw.device), torch.cat(odd).to(grid_thw.device)

    def forward(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.spatial_linear(x.reshape(-1, x.shape[-1] * self.merge**2))
        even, odd = self.pair_index(grid_thw)
        x = self.temporal_linear(torch.cat([x[even], x[odd]], dim=-1))
        return self.after_norm(self.mlp(x))

    def tokens_per_item(self, grid_thw: torch.Tensor) -> list[int]:
        t = grid_thw[:, 0]
        pairs = torch.where(t > 1, (t + 1) // self.t_merge, torch.ones_like(t))
        return (pairs * grid_thw[:, 1] * grid_thw[:, 2] // self.merge**2).tolist()
