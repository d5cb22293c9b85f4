"""The dense building blocks of the trunk: RMSNorm, interleaved RoPE, GQA attention, SwiGLU.

Plain PyTorch, the maths only: no kernel choice, cache policy, quantization or sharding lives here (the
runtime swaps in its fast variants of these modules: `ernie45.runtime.prepare`). A KV cache is any object with
``update(k, v, layer_idx) -> (k_all, v_all)`` (transformers' caches and the engine's own both fit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FlashMask, flashmask_attention
from ..config import Ernie45Config


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: the weight multiplies after casting back to the input dtype (docs/architecture.md,
    pitfall 10)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """inv_freq[j] = theta^(-2j/D) for the D/2 rotation pairs; made once per (D, theta, device), as a plain tensor
    even under inference mode (a decode step spent 5 torch ops on it)."""
    key = (head_dim, float(theta), torch.device(device or "cpu"))
    if key not in _INV_FREQ:
        with torch.inference_mode(False), torch.no_grad():
            j = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
            _INV_FREQ[key] = (1.0 / theta ** (j / head_dim)).float()
    return _INV_FREQ[key]


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, t_pairs: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every rotation pair, fp32, shape [B, S, D/2].

    position_ids: [B, S], or [3, B, S] (t, h, w) for 3D RoPE: pairs below D/2 - t_pairs alternate
    h (even) and w (odd); the last t_pairs pairs turn with t (docs/architecture.md §2.1).
    """
    inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)
    if position_ids.dim() == 2:
        angles = position_ids[..., None].float() * inv_freq
    else:
        pairs = torch.arange(head_dim // 2, device=position_ids.device)
        axis = torch.where(pairs >= head_dim // 2 - t_pairs, 0, 1 + pairs % 2)  # 0 t, 1 h, 2 w
        pos = position_ids.float()[axis]  # [P, B, S]: each pair's own axis
        angles = pos.permute(1, 2, 0) * inv_freq
    return angles.cos(), angles.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x [B, H, S, D] by angle j (GPT-J style), in fp32 (docs/architecture.md,
    "Positions")."""
    x32 = x.float()
    x0, x1 = x32[..., 0::2], x32[..., 1::2]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention, no bias, no QK-norm, scale head_dim^-0.5."""

    def __init__(self, config: Ernie45Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d, b = config.hidden_size, config.head_dim, config.use_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=b)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=b)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=b)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=b)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q [B, H, S, D] and k, v [B, KV, S, D], q and k rotated."""
        b, s, _ = x.shape
        # heads as the projections give them: under tensor parallelism each rank holds a share of them
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        return apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope), v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | FlashMask | None,
        cache: Any = None,
    ) -> torch.Tensor:
        """mask: None for plain causal attention, a bool [B, 1, Sq, Sk] (True = may attend), or a FlashMask."""
        b, s, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.o_proj(self.attend(q, k, v, mask).transpose(1, 2).reshape(b, s, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over the cached and new keys: [B, H, S, D]."""
        s = q.shape[2]
        if isinstance(mask, FlashMask):
            if k.shape[2] != s:
                raise ValueError("a FlashMask covers one whole sequence; it cannot follow cached tokens")
            return flashmask_attention(q, k, v, mask, scale=self.head_dim**-0.5)
        if mask is None and s > 1 and k.shape[2] != s:
            raise ValueError("a chunk after cached tokens needs an explicit mask; build it with attention_mask()")
        causal = mask is None and s > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5, enable_gqa=True
        )


def attention_mask(
    padding_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """The mask the attention layers take: None when plain causal attention suffices.

    padding_mask: [B, kv_len] with 1 for real tokens (transformers' ``attention_mask``), or None.
    Queries sit at the last q_len of kv_len positions. A query whose row would be empty (a pad query
    in a left-padded batch) may see itself, so no row is all-masked and no NaN can reach real tokens.
    """
    if (padding_mask is None or bool(padding_mask.all())) and (q_len == kv_len or q_len == 1):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, Sq, Sk]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].bool()
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    return allowed


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, hidden: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
