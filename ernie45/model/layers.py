"""The dense building blocks of the trunk: RMSNorm, interleaved RoPE, GQA attention, SwiGLU.

Plain PyTorch: no cache policy, quantization or sharding lives here. A KV cache is any object with
``update(k, v, layer_idx) -> (k_all, v_all)`` (transformers' caches and the engine's own both fit). On CPU,
outside autograd, RMSNorm, RoPE, SwiGLU's product and one-query attention run as single fused calls where
`cpu_gemv` builds (the same roundings; a decode step makes ~250 tiny op calls fewer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FlashMask, flashmask_attention
from ..config import Ernie45Config
from . import cpu_gemv


class RMSNorm(nn.Module):
    """Llama-style RMSNorm; the weight multiplies after casting back to the input dtype (spec pitfall 10)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and cpu_gemv.fused(x, self.weight):
            return cpu_gemv.rmsnorm(x, self.weight, self.eps)
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
    h (even) and w (odd); the last t_pairs pairs turn with t (spec §2.1).
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
    """Rotate pairs (2j, 2j+1) of x [B, H, S, D] by angle j (GPT-J style), in fp32 (spec §2, pitfall 1).

    Eager, as one complex multiply (each pair a complex number): 4 kernels instead of 9, which matters in a
    decode step where every op is tiny; the same products and sums, so the same numbers. Under torch.compile
    the real-valued form (inductor fuses it; it does not lower complex tensors).
    """
    if x.stride(-1) == 1 and cpu_gemv.fused(x):
        return cpu_gemv.rope(x, cos, sin)
    if torch.compiler.is_compiling():
        x32 = x.float()
        x0, x1 = x32[..., 0::2], x32[..., 1::2]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None]).flatten(-2).to(x.dtype)


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
        self.qkv_proj: nn.Module | None = None  # q, k, v as one matmul: set by fuse_projections (inference)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q [B, H, S, D] and k, v [B, KV, S, D], q and k rotated."""
        b, s, _ = x.shape
        if self.qkv_proj is None:
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            return apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope), v
        qkv = self.qkv_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        qk = apply_interleaved_rope(qkv[:, : self.num_heads + self.num_kv_heads], *rope)  # one rotation for both
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, self.num_heads + self.num_kv_heads :]

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
        if isinstance(mask, FlashMask):
            if k.shape[2] != s:
                raise ValueError("a FlashMask covers one whole sequence; it cannot follow cached tokens")
            out = flashmask_attention(q, k, v, mask, scale=self.head_dim**-0.5)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        causal = mask is None and s > 1
        if mask is None and s > 1 and k.shape[2] != s:
            raise ValueError("a chunk after cached tokens needs an explicit mask; build it with attention_mask()")
        if s == 1 and cpu_gemv.fused(q, k, v) and cpu_gemv.attention_fits(q, k, mask):
            out = cpu_gemv.decode_attention(q, k, v, mask, self.head_dim**-0.5)
        elif s == 1 and q.dtype == torch.float32 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            out = _one_query_attention(q, k, v, mask, self.head_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5, enable_gqa=True
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def decode_block(
        self, h: torch.Tensor, norm: RMSNorm, rope: tuple[torch.Tensor, torch.Tensor], mask: Any, cache: Any
    ) -> torch.Tensor | None:
        """h + self(norm(h)) for one decode token as one `cpu_gemv` call (no module or torch op calls from
        Python, the same numbers), or None where it does not apply (`decode_weights`)."""
        weights = self.decode_weights(h, norm, mask, cache)
        if weights is None:
            return None
        slot = cache.reserve(self.layer_idx, 1)
        return cpu_gemv.attention_block(h, norm.weight, norm.eps, *weights, rope, slot, mask, self.head_dim**-0.5)

    def decode_weights(
        self, h: torch.Tensor, norm: RMSNorm, mask: Any, cache: Any
    ) -> tuple[cpu_gemv.Weight, cpu_gemv.Weight] | None:
        """(qkv, o) as the fused decode call reads them, or None where that call does not apply: one token, CPU,
        fp32 or bf16, fused q/k/v in a form it reads (`decode_weight`), a cache of h's dtype that hands out its
        buffers (`reserve`)."""
        if h.shape[1] != 1 or getattr(cache, "reserve", None) is None or getattr(cache, "dtype", None) != h.dtype:
            return None
        if self.qkv_proj is None:
            return None
        qkv, o = decode_weight(self.qkv_proj, h.dtype), decode_weight(self.o_proj, h.dtype)
        if qkv is None or o is None or norm.weight.dtype != h.dtype or isinstance(mask, FlashMask):
            return None
        if not cpu_gemv.heads_fit(self.num_heads, self.num_kv_heads, self.head_dim, mask):
            return None
        return (qkv, o) if cpu_gemv.fused(h, norm.weight, qkv[0], o[0]) else None


_NO_SCALES = torch.empty(0)


def decode_weight(linear: nn.Module, dtype: torch.dtype) -> cpu_gemv.Weight | None:
    """How a fused decode call reads this linear (no bias): an `nn.Linear` of `dtype` or a bf16 `PackedLinear`'s
    plain weight as (w, empty, 0), an int4 quantized linear's tiles as (tiles, scales, group); else None."""
    if getattr(linear, "bias", None) is not None:
        return None
    if hasattr(linear, "int4_tiles"):  # model.quant.QuantLinear (not imported here: it builds on layers)
        return linear.int4_tiles()
    w = linear.weight if type(linear) is nn.Linear else getattr(linear, "plain", None)
    ok = w is not None and w.dtype == dtype and w.is_contiguous()
    return (w, _NO_SCALES, 0) if ok else None


def _one_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Decode attention in fp32 on CPU as two matmuls with the query heads grouped by their KV head: 1.3x (512
    cached) to 2.5x (2k) faster than SDPA's flash kernel, which tiles for many queries."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(b, kv, h // kv, d) * scale, k.transpose(-1, -2))  # [B, KV, H/KV, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).reshape(b, h, 1, d)


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
        self.gate_up_proj: nn.Module | None = None  # gate and up as one matmul: set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if cpu_gemv.fused(gate_up):
                return self.down_proj(cpu_gemv.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_block(self, h: torch.Tensor, norm: RMSNorm) -> torch.Tensor | None:
        """h + self(norm(h)) for decode-sized h as one `cpu_gemv` call, or None where it does not apply."""
        weights = self.decode_weights(h, norm)
        return None if weights is None else cpu_gemv.mlp_block(h, norm.weight, norm.eps, *weights)

    def decode_weights(self, h: torch.Tensor, norm: RMSNorm) -> tuple[cpu_gemv.Weight, cpu_gemv.Weight] | None:
        """(gate_up, down) as the fused decode call reads them, or None where that call does not apply."""
        if self.gate_up_proj is None or norm.weight.dtype != h.dtype:
            return None
        gate_up, down = decode_weight(self.gate_up_proj, h.dtype), decode_weight(self.down_proj, h.dtype)
        if gate_up is None or down is None or h.shape[1] != 1:
            return None
        return (gate_up, down) if cpu_gemv.fused(h, norm.weight, gate_up[0], down[0]) else None


def _stacked(*linears: nn.Module) -> nn.Module:
    """The linears' output rows one under the other, as one linear (a module type with `stack`, such as the
    quantized linear, stacks itself)."""
    if type(linears[0]) is not nn.Linear:
        return type(linears[0]).stack(*linears)
    w = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


def _stackable(*linears: nn.Module) -> bool:
    kind = type(linears[0])
    same = all(type(m) is kind for m in linears)
    return same and (kind is nn.Linear or (hasattr(kind, "stack") and kind.stackable(*linears)))


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Inference only: each attention's q, k, v and each SwiGLU's gate and up become one linear (a decode step
    then makes 4 matmul calls per layer instead of 7, on longer matrices that stream faster). Run before
    quantizing or packing (those then see the fused linear; per-row quantization gives the same codes), or on
    a loaded quantized checkpoint (its int8 / int4 codes stack as they are). The fused model's state dict no
    longer has the official names: the engine does this to the models it owns.
    Returns how many were fused."""
    n = 0
    for m in list(model.modules()):
        if isinstance(m, Attention) and m.qkv_proj is None and _stackable(m.q_proj, m.k_proj, m.v_proj):
            m.qkv_proj = _stacked(m.q_proj, m.k_proj, m.v_proj)
            m.q_proj = m.k_proj = m.v_proj = None
            n += 1
        elif isinstance(m, SwiGLU) and m.gate_up_proj is None and _stackable(m.gate_proj, m.up_proj):
            m.gate_up_proj = _stacked(m.gate_proj, m.up_proj)
            m.gate_proj = m.up_proj = None
            n += 1
    return n
