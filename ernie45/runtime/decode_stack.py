"""A dense stack's CPU decode step as one C++ call (`kernels.dense_stack`), with its plan kept between steps.

Called one layer half at a time, each call found Python's own code and data pushed out of the caches by the
weights the call before had streamed, and a decode step spent a good part of its time between calls. Deciding
per step whether every layer can take the fused path (`decode_weights`) still cost milliseconds of Python,
so the plan is kept and only checked: each module and tensor it uses must still sit where it was found (the
containing dict and key), and the step's conditions (dtype, batch, mask kind, cache type, kernel switch) must match.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..model.moe import MoEBlock
from . import kernels
from .kv_cache import FusedCache

_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layers -> (conditions, checks, plan)
_last: list = [None]  # (weakref to the layers, their plan): the last stack stepped, found without a lookup


def _where(owner: Any, obj: Any) -> tuple[dict, str, Any] | None:
    """(dict, key, obj): where `owner` holds `obj` (its parameters, buffers, submodules or attributes), or None."""
    for d in (owner._parameters, owner._buffers, owner._modules, vars(owner)):
        for k, v in d.items():
            if v is obj:
                return d, k, obj
    return None


def _build(layers: nn.ModuleList, h: torch.Tensor, mask: Any, cache: Any) -> tuple[list, list | None] | None:
    """(plan, checks): per layer (index, norm1, (qkv, o), scale, norm2, (gate_up, down)), and where each module
    and tensor it uses was found (None: something was not found, the plan serves this step only); or None where a
    layer does not take the fused path."""
    plan, checks = [], []
    for key, layer in layers._modules.items():
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        if isinstance(mlp, MoEBlock) or not hasattr(mlp, "decode_weights") or not hasattr(attn, "decode_weights"):
            return None  # (the fused modules: `runtime.fused`, which imports this module)
        a, m = attn.decode_weights(h, norm1, mask, cache), mlp.decode_weights(h, norm2)
        if a is None or m is None:
            return None
        plan.append((attn.layer_idx, norm1, a, attn.head_dim**-0.5, norm2, m))
        found = [(layers._modules, key, layer), _where(norm1, norm1.weight), _where(norm2, norm2.weight)]
        found += [_where(layer, part) for part in (attn, mlp, norm1, norm2)]
        linears = ((attn, attn.qkv_proj, a[0]), (attn, attn.o_proj, a[1]), (mlp, mlp.gate_up_proj, m[0]),
                   (mlp, mlp.down_proj, m[1]))  # fmt: skip
        for parent, linear, (w, scales, _) in linears:
            found += [_where(parent, linear), _where(linear, w)] + ([_where(linear, scales)] if scales.numel() else [])
        checks += found
    return plan, None if any(c is None for c in checks) else checks


def _packed(plan: list) -> kernels.Packed:
    """The whole stack's weights as `kernels.dense_stack` takes them, packed once with the plan."""
    fields: list = []
    for _, norm1, (qkv, o), scale, norm2, (gate_up, down) in plan:
        fields += (norm1.weight, norm1.eps, qkv, o, scale, norm2.weight, norm2.eps, gate_up, down)
    return kernels.pack(*fields)


def _kept(layers: nn.ModuleList) -> tuple | None:
    """The plan kept for `layers`: the last stack stepped is found without a mapping lookup (after the weights
    streamed past, even a `WeakKeyDictionary.get` was a visible part of a step)."""
    last = _last[0]
    return last[1] if last is not None and last[0]() is layers else _plans.get(layers)


def _remember(layers: nn.ModuleList, kept: tuple) -> None:
    """Make `kept` the last plan, dropped with its layers (the plan holds their weights)."""

    def forget(ref: weakref.ref) -> None:
        if _last[0] is not None and _last[0][0] is ref:
            _last[0] = None

    _last[0] = (weakref.ref(layers, forget), kept)


def step(layers: nn.ModuleList, h: torch.Tensor, rope, mask: Any, cache: Any) -> torch.Tensor | None:
    """h after every layer for one decode token as one call, or None where the stack cannot take it (a MoE layer,
    weights the call does not read, a prefill, autograd, a cache that does not hand out its buffers). The plan is
    kept only with gradients off (the engine's case), since whether a tensor requires grad is not checked."""
    if h.shape[1] != 1 or not isinstance(cache, FusedCache) or torch.compiler.is_compiling():
        return None
    mask_kind = None if mask is None else (type(mask), getattr(mask, "dtype", None))
    conditions = (h.dtype, h.device, h.shape[0], mask_kind, type(cache), cache.dtype, len(layers),
                  kernels._mode())  # fmt: skip
    kept = None if torch.is_grad_enabled() else _kept(layers)  # (requires_grad is not in the conditions)
    if kept is None or kept[0] != conditions or not all(d.get(k) is v for d, k, v in kept[1]):
        _plans.pop(layers, None)
        _last[0] = None
        built = _build(layers, h, mask, cache)
        if built is None:
            return None
        kept = (conditions, built[1], ([p[0] for p in built[0]], _packed(built[0])))
        if built[1] is not None and not torch.is_grad_enabled():
            _plans[layers] = kept
            _remember(layers, kept)
    layer_ids, weights = kept[2]
    start = cache.get_seq_length(layer_ids[0]) if layer_ids else None
    if start is None or any(cache.get_seq_length(idx) != start for idx in layer_ids):
        return None
    caches = []
    for idx in layer_ids:
        slot = cache.reserve(idx, 1)
        caches += (slot.k, slot.v)
    return kernels.dense_stack(h, weights, caches, rope, mask, slot.start, slot.write_at)
