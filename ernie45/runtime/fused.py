"""The runtime's fast variants of the model's modules, swapped in by `prepare` for inference.

Each is a subclass of the plain module it replaces, built from it (`from_plain`: the same weights, no copy) and
computing the same function; what differs is how. Attention and SwiGLU take their projections as one matmul
each (q/k/v, gate/up: fewer, longer weight reads per decode step). On CPU outside autograd, RMSNorm, RoPE,
SwiGLU's product and one-query attention run as single C++ calls (`kernels`), a decode layer as two calls (its
attention half and its MLP half, `decode_block`) and a dense stack's decode step as one (`FusedDecoderStack`);
each with the plain code's roundings, so the numbers are the same bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FlashMask
from ..model.layers import Attention, RMSNorm, SwiGLU, apply_interleaved_rope
from ..model.moe import ExpertGroup, MoEBlock
from ..model.trunk import DecoderLayer, DecoderStack
from . import decode_stack, kernels
from .kv_cache import FusedCache, Slot
from .packed import bf16_matmul_in_fp32, linear_rows

GATHER_MAX_ROWS = 16  # up to this many (token, expert) pairs, gather the experts' weights instead of sorting
GROUPED_MM = hasattr(torch, "_grouped_mm")
_NO_SCALES = torch.empty(0)


def become(cls: type, plain: nn.Module, **attrs: Any) -> nn.Module:
    """A new module of `cls` holding `plain`'s parameters, buffers, submodules and settings (shared, not copied),
    plus `attrs`; `plain` itself is left as it was."""
    new = cls.__new__(cls)
    new.__dict__.update(plain.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        new.__dict__[registry] = dict(plain.__dict__[registry])
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and kernels.fused(x, self.weight):
            return kernels.rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_interleaved_rope` in one kernel call for decode-sized x, else as one complex multiply (4 kernels
    instead of 9: the same products and sums, so the same numbers)."""
    if x.stride(-1) == 1 and kernels.fused(x):
        return kernels.rope(x, cos, sin)
    if torch.compiler.is_compiling():  # inductor does not lower complex tensors; it fuses the real form itself
        return apply_interleaved_rope(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None]).flatten(-2).to(x.dtype)


def stacked(*linears: nn.Module) -> nn.Module:
    """The linears' output rows one under the other, as one linear (a module type with `stack`, such as the
    quantized linear, stacks itself)."""
    if type(linears[0]) is not nn.Linear:
        return type(linears[0]).stack(*linears)
    w = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


def stackable(*linears: nn.Module) -> bool:
    kind = type(linears[0])
    same = all(type(m) is kind for m in linears)
    return same and (kind is nn.Linear or (hasattr(kind, "stack") and kind.stackable(*linears)))


def decode_weight(linear: nn.Module, dtype: torch.dtype) -> kernels.Weight | None:
    """How a fused decode call reads this linear (no bias): an `nn.Linear` of `dtype` or a bf16 `PackedLinear`'s
    plain weight as (w, empty, 0), a quantized linear's int4 tiles as (tiles, scales, group) or int8 codes as
    (codes, scales, 0); else None."""
    if getattr(linear, "bias", None) is not None:
        return None
    quantized = getattr(linear, "kernel_weight", None)  # runtime.quant.QuantLinear (it imports this module)
    if quantized is not None:
        return quantized()
    w = linear.weight if type(linear) is nn.Linear else getattr(linear, "plain", None)
    ok = w is not None and w.dtype == dtype and w.is_contiguous()
    return (w, _NO_SCALES, 0) if ok else None


class FusedAttention(Attention):
    """Attention with q, k, v as one linear (`qkv_proj`) and the CPU decode kernels."""

    @classmethod
    def from_plain(cls, attn: Attention) -> FusedAttention:
        new = become(cls, attn, qkv_proj=stacked(attn.q_proj, attn.k_proj, attn.v_proj))
        del new.q_proj, new.k_proj, new.v_proj
        return new

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        qk = fast_rope(qkv[:, : self.num_heads + self.num_kv_heads], *rope)  # one rotation for both
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, self.num_heads + self.num_kv_heads :]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        if q.shape[2] == 1 and not isinstance(mask, FlashMask):
            if kernels.fused(q, k, v) and kernels.attention_fits(q, k, mask):
                return kernels.decode_attention(q, k, v, mask, self.head_dim**-0.5)
            if q.dtype == torch.float32 and q.device.type == "cpu":
                return _one_query_attention(q, k, v, mask, self.head_dim**-0.5)
        return super().attend(q, k, v, mask)

    def decode_block(self, h: torch.Tensor, norm: RMSNorm, rope, mask: Any, cache: Any) -> torch.Tensor | None:
        """h + self(norm(h)) for one decode token as one kernel call (the same numbers), or None where it does not
        apply (`decode_weights`)."""
        weights = self.decode_weights(h, norm, mask, cache)
        if weights is None:
            return None
        slot = cache.reserve(self.layer_idx, 1)
        qkv, o = weights
        packed = kernels.attention_weights(norm.weight, norm.eps, qkv, o, self.head_dim**-0.5)
        return kernels.attention_block(h, packed, rope, slot, mask)

    def continuation_block(self, h: torch.Tensor, norm: RMSNorm, steps: Continuation,
                           cache: Any) -> torch.Tensor | None:  # fmt: skip
        """h [1, T, E] + self(norm(h)) for T tokens that continue one cached row (a speculative verify) as one
        kernel call, or None where the decode call does not apply. The tokens go in as the call's rows: each
        writes its K and V at its own position of the same cache row (the row's buffers seen T times over) and
        attends up to its own position, so q|k|v and o are read once for all T, and each token's numbers are those
        of decoding it alone."""
        t = h.shape[1]
        rows = h.transpose(0, 1)  # [T, 1, E]: a token per row
        weights = self.decode_weights(rows, norm, None, cache)
        if weights is None:
            return None
        slot = cache.reserve(self.layer_idx, t)
        if slot.k.shape[0] != 1 or slot.write_at is not None or slot.start != steps.start:
            raise RuntimeError("a continuation's cache slot must be one row that writes at the continuation's start")
        k, v = (buf.expand(t, -1, -1, -1) for buf in (slot.k, slot.v))
        packed = kernels.attention_weights(norm.weight, norm.eps, *weights, self.head_dim**-0.5)
        slot = Slot(k, v, steps.start + t - 1, steps.write_at)  # attention reads up to the last token's position
        out = kernels.attention_block(rows.contiguous(), packed, steps.rope, slot, steps.seen)
        return out.transpose(0, 1)

    def decode_weights(self, h: torch.Tensor, norm: RMSNorm, mask: Any,
                       cache: Any) -> tuple[kernels.Weight, kernels.Weight] | None:  # fmt: skip
        """(qkv, o) as the fused decode call reads them, or None where it does not apply: one token, CPU, fp32
        or bf16, weights in a form it reads (`decode_weight`), a cache that writes in place (`FusedCache`) of
        h's dtype."""
        if h.shape[1] != 1 or not isinstance(cache, FusedCache) or cache.dtype != h.dtype:
            return None
        qkv, o = decode_weight(self.qkv_proj, h.dtype), decode_weight(self.o_proj, h.dtype)
        if qkv is None or o is None or norm.weight.dtype != h.dtype or isinstance(mask, FlashMask):
            return None
        if not kernels.heads_fit(self.num_heads, self.num_kv_heads, self.head_dim, mask):
            return None
        return (qkv, o) if kernels.fused(h, norm.weight, qkv[0], o[0]) else None


def _one_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Decode attention in fp32 on CPU as two matmuls with the query heads grouped by their KV head: faster than
    SDPA's flash kernel, which tiles for many queries, and more so the longer the cache (docs/performance.md)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(b, kv, h // kv, d) * scale, k.transpose(-1, -2))  # [B, KV, H/KV, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).reshape(b, h, 1, d)


class FusedSwiGLU(SwiGLU):
    """SwiGLU with gate and up as one linear (`gate_up_proj`) and SwiGLU's product in one kernel call."""

    @classmethod
    def from_plain(cls, mlp: SwiGLU) -> FusedSwiGLU:
        new = become(cls, mlp, gate_up_proj=stacked(mlp.gate_proj, mlp.up_proj))
        del new.gate_proj, new.up_proj
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if kernels.fused(gate_up):
            return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def decode_block(self, h: torch.Tensor, norm: RMSNorm) -> torch.Tensor | None:
        """h + self(norm(h)) for decode-sized h as one kernel call, or None where it does not apply."""
        weights = self.decode_weights(h, norm)
        return None if weights is None else kernels.mlp_block(h, kernels.mlp_weights(norm.weight, norm.eps, *weights))

    def decode_weights(self, h: torch.Tensor, norm: RMSNorm) -> tuple[kernels.Weight, kernels.Weight] | None:
        if norm.weight.dtype != h.dtype or h.shape[1] != 1:
            return None
        gate_up, down = decode_weight(self.gate_up_proj, h.dtype), decode_weight(self.down_proj, h.dtype)
        if gate_up is None or down is None:
            return None
        return (gate_up, down) if kernels.fused(h, norm.weight, gate_up[0], down[0]) else None


class FastExpertGroup(ExpertGroup):
    """The routed experts by the fastest route for the rows at hand (the same sum)."""

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode rows of bf16 on CPU: tokens sorted by expert, each expert hit through the bf16 matvec kernel.
        Other few tokens: each token's k experts' weights gathered and applied as one batched matmul, so a step
        touches only the experts it uses. Many tokens without autograd (prefill): one grouped matmul over the
        stacked weights. Otherwise the plain route (one matmul pair per expert hit)."""
        n, k = ids.shape
        if n <= kernels.MAX_ROWS and self.kernel_reads(x):
            return self.sorted_experts(x, ids, weights)
        half_cpu = x.device.type == "cpu" and self.gate_up_proj.dtype in (torch.bfloat16, torch.float16)
        # (on CPU the gathered bf16 einsum is far slower than one matmul per expert hit: docs/performance.md)
        if n * k <= GATHER_MAX_ROWS and not kernels.needs_grad(x, self.gate_up_proj) and not half_cpu:
            h = torch.einsum("nh,nkih->nki", x, self.gate_up_proj[ids].to(x.dtype))
            gate, up = h.chunk(2, dim=-1)
            y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down_proj[ids].to(x.dtype))
            return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)
        grouped = GROUPED_MM and not kernels.needs_grad(x, self.gate_up_proj) and x.dtype == self.gate_up_proj.dtype
        if half_cpu and grouped and bf16_matmul_in_fp32():
            grouped = False  # bf16 slower than fp32 here: each expert's rows widened (`expert`)
        return self.sorted_experts(x, ids, weights, grouped)

    def kernel_reads(self, x: torch.Tensor) -> bool:
        """Whether the bf16 matvec kernel runs the experts for these (few) bf16 rows here and now."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if x.dtype != torch.bfloat16 or w1.dtype != torch.bfloat16 or kernels.needs_grad(x, w1):
            return False
        return kernels.usable(w1[0]) and kernels.usable(w2[0]) and kernels.ready()

    def decode_experts(self, x: torch.Tensor) -> kernels.Experts | None:
        """Every expert's (gate_up, down) as `kernels.moe_block` reads them for decode rows x, or None: bf16 experts
        through the bf16 matvec kernel, fp32 experts through torch's linear inside the call (the demo model as
        shipped: one call a MoE half instead of ~40 ops from Python)."""
        w1 = self.gate_up_proj
        fp32 = x.dtype == w1.dtype == self.down_proj.dtype == torch.float32 and w1.device.type == "cpu"
        if not (fp32 and not kernels.needs_grad(x, w1) and kernels.ready()) and not self.kernel_reads(x):
            return None
        w2 = self.down_proj
        if not (w1.is_contiguous() and w2.is_contiguous()):
            return None
        return [w1], [], [w2], [], 0  # stacked: the call reads expert e as w1[e] (no 2 x 64 list elements to pass)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.gate_up_proj[e], self.down_proj[e]
        rows_fit = x.shape[0] <= kernels.MAX_ROWS and kernels.usable(w1) and kernels.usable(w2)
        if rows_fit and not kernels.needs_grad(x, w1) and kernels.ready():
            return kernels.gemv(kernels.silu_mul(kernels.gemv(x, w1)), w2, x.dtype == torch.bfloat16).to(x.dtype)
        if not kernels.needs_grad(x, w1):  # (widened to fp32 where bf16 is the slower: `linear_rows`)
            gate, up = linear_rows(x, w1).chunk(2, dim=-1)
            return linear_rows(F.silu(gate) * up, w2)
        return super().expert(e, x)


class FusedMoEBlock(MoEBlock):
    def decode_block(self, h: torch.Tensor, norm: RMSNorm, modality: torch.Tensor | None = None) -> torch.Tensor | None:
        """h + self(norm(h), modality) for decode rows (h [B <= 8, 1, H]) as one kernel call, the same numbers, or
        None where it does not apply: every row routed by one group (text decode), the kernels reading that
        group's experts (`decode_experts`) and the shared experts (`decode_weight`), nothing for autograd."""
        if h.shape[1] != 1 or h.shape[0] > kernels.MAX_ROWS or norm.weight.dtype != h.dtype:
            return None
        group = self._group_of_all(modality)
        reader = getattr(group, "decode_experts", None)
        experts = None if reader is None else reader(h.reshape(h.shape[0], -1))
        if experts is None or not kernels.fused(h, norm.weight):
            return None
        shared = None
        if self.shared_experts is not None:
            up = getattr(self.shared_experts, "gate_up_proj", None)
            shared = None if up is None else (decode_weight(up, h.dtype),
                                              decode_weight(self.shared_experts.down_proj, h.dtype))  # fmt: skip
            if shared is None or None in shared:
                return None
        return kernels.moe_block(h, norm.weight, norm.eps, group.gate, experts, shared)

    def _group_of_all(self, modality: torch.Tensor | None) -> ExpertGroup | None:
        """The group every row is routed by when that is one group: the only one, or the text group for text rows."""
        if len(self.groups) == 1:
            return next(iter(self.groups.values()))
        if modality is not None and bool(modality.any()):
            return None
        return next((self.groups[n] for n, mods in self.group_modalities.items() if 0 in mods), None)


class FusedDecoderLayer(DecoderLayer):
    """A decoder layer whose decode step runs as two kernel calls (attention half, MLP half) where they apply."""

    def forward(self, h: torch.Tensor, rope, mask, cache=None, modality=None, router_out=None) -> torch.Tensor:
        if 1 < h.shape[1] <= kernels.MAX_ROWS and router_out is None:  # a layer called alone (the MTP block's)
            steps = continuation(h, rope, mask, cache, self.self_attn.layer_idx)
            if steps is not None:
                return self.few_tokens(h, steps, rope, mask, cache, modality)
        attn, mlp = self.self_attn, self.mlp
        norm = self.input_layernorm
        fused = attn.decode_block(h, norm, rope, mask, cache) if isinstance(attn, FusedAttention) else None
        h = h + attn(norm(h), rope, mask, cache) if fused is None else fused
        norm = self.post_attention_layernorm
        if isinstance(mlp, MoEBlock):
            takes = isinstance(mlp, FusedMoEBlock) and router_out is None
            fused = mlp.decode_block(h, norm, modality) if takes else None
            return h + mlp(norm(h), modality, router_out) if fused is None else fused
        fused = mlp.decode_block(h, norm) if isinstance(mlp, FusedSwiGLU) else None
        return h + mlp(norm(h)) if fused is None else fused

    def few_tokens(self, h: torch.Tensor, steps: Continuation, rope, mask, cache, modality=None) -> torch.Tensor:
        """h after this layer for a short continuation of one row (`FusedDecoderStack`): the attention half as one
        decode call with the tokens as its rows (`continuation_block`), the MLP half over the tokens as decode rows;
        the numbers decoding them one at a time gives. A half whose call does not apply runs the plain code."""
        attn, norm = self.self_attn, self.input_layernorm
        out = attn.continuation_block(h, norm, steps, cache) if isinstance(attn, FusedAttention) else None
        h = h + attn(norm(h), rope, mask, cache) if out is None else out
        mlp, norm, flat = self.mlp, self.post_attention_layernorm, h.reshape(-1, 1, h.shape[-1])
        out = None
        if isinstance(mlp, FusedMoEBlock):
            out = mlp.decode_block(flat, norm, modality)
        elif isinstance(mlp, FusedSwiGLU):
            out = mlp.decode_block(flat, norm)
        if out is not None:
            return out.view_as(h)
        return h + (mlp(norm(h), modality) if isinstance(mlp, MoEBlock) else mlp(norm(h)))


class FusedDecoderStack(DecoderStack):
    """The decoder layers; a dense stack's decode step in one kernel call where every layer takes it, and a short
    continuation of one row (a speculative verify: the last token and its drafts) through the decode calls, the
    tokens as a call's rows, so each layer's weights are read once for all of them."""

    def forward(self, h: torch.Tensor, rope, mask, cache=None, modality=None, router_out=None) -> torch.Tensor:
        if router_out is None:
            stack = decode_stack.step(self, h, rope, mask, cache)
            if stack is not None:
                return stack
            steps = continuation(h, rope, mask, cache, self[0].self_attn.layer_idx) if len(self) else None
            if steps is not None:
                for layer in self:
                    if isinstance(layer, FusedDecoderLayer):
                        h = layer.few_tokens(h, steps, rope, mask, cache, modality)
                    else:
                        h = layer(h, rope, mask, cache, modality)
                return h
        return super().forward(h, rope, mask, cache, modality, router_out)


def continuation(h: torch.Tensor, rope, mask, cache, layer_idx: int) -> Continuation | None:
    """What the layer calls take for a continuation of 2 to MAX_ROWS tokens of one row after cached ones (in
    layer `layer_idx` of a `FusedCache`), outside autograd, with a causal bool mask (or none); else None."""
    b, n = h.shape[:2]
    if b != 1 or not 1 < n <= kernels.MAX_ROWS or not isinstance(cache, FusedCache) or torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling() or h.device.type != "cpu":
        return None
    start = cache.get_seq_length(layer_idx)
    if not start:
        return None  # a prompt: the prefill path
    causal = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]  # [n, start + n]
    if mask is not None:
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
                and mask.shape[-2:] == (n, start + n) and mask.shape[:2] == (1, 1)):  # fmt: skip
            return None
        seen = mask[0, 0].cpu()
        if bool((seen & ~causal).any()):
            return None  # a token that sees later ones: not a continuation
        causal = seen
    cos, sin = (r.reshape(n, 1, -1).float().contiguous() for r in rope)  # [n, 1, D/2]: a token per row
    return Continuation((cos, sin), causal[:, None, None, :].contiguous(), start, torch.arange(start, start + n))


class Continuation(NamedTuple):
    """A short continuation of one cached row as the layer calls take it, made once for every layer: per token
    its RoPE (cos, sin [T, 1, D/2]) and the positions it sees (seen [T, 1, 1, start + T]); the first token's
    position (`start`) and each token's (`write_at`)."""

    rope: tuple[torch.Tensor, torch.Tensor]
    seen: torch.Tensor
    start: int
    write_at: torch.Tensor
