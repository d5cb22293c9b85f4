"""ERNIE 4.5's mixture-of-experts block (docs/architecture.md §2): modality-routed expert groups plus shared experts.

Each group (text, vision, ...) has its own fp32 router, its own correction-bias row (used for expert
*selection* only) and its own stacked experts ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``.
A token is routed by the group that lists its modality id; the shared SwiGLU sees every token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Ernie45Config
from .layers import SwiGLU


class RouterRecord(NamedTuple):
    """What one routed group of one MoE layer decided in a forward (`output_router_logits=True`): what the
    training losses and the correction-bias update read."""

    layer: int
    group: str  # the expert group's name ("text", "vision", ...)
    logits: torch.Tensor  # [N, E] fp32 router logits of the group's tokens
    experts: torch.Tensor  # [N, k] the experts each token was sent to
    rows: torch.Tensor | None  # which of the layer's flattened tokens these are (None: all of them)
    orthogonal: torch.Tensor  # the router's orthogonality loss, from its weight as the forward saw it


def _whole(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a DTensor shard is gathered (transformers' FSDP with expert parallelism shards a group's router
    with its experts, and the router runs before the group's own forward would gather it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Router(nn.Module):
    """fp32 softmax router with an aux-loss-free correction bias that only steers top-k selection."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
        self.top_k = top_k
        self.norm_min = norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (logits [N, E] fp32, weights [N, k] in x's dtype, expert ids [N, k])."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), _whole(self.weight).float())
            probs = logits.softmax(dim=-1)
            ids = torch.topk(probs + _whole(self.e_score_correction_bias).float(), self.top_k, dim=-1).indices
            weights = probs.gather(-1, ids)
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return logits, weights.to(x.dtype), ids

    def orthogonality(self) -> torch.Tensor:
        """||W_n W_n^T - I||_F^2 / E^2 with rows L2-normalised. Read inside the forward, where FSDP and ZeRO-3 have
        gathered the weight (outside it, it is a shard)."""
        w = F.normalize(_whole(self.weight).float(), dim=-1, eps=1e-12)
        e = w.shape[0]
        return (w @ w.T - torch.eye(e, device=w.device)).pow(2).sum() / e**2


class ExpertGroup(nn.Module):
    """One routed group: its router and its experts, stored stacked so a grouped kernel can run them."""

    def __init__(self, hidden: int, num_experts: int, width: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.gate = Router(hidden, num_experts, top_k, norm_min)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.num_experts = num_experts

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_k · Expert_{ids_k}(x), tokens sorted by expert, one matmul pair per expert hit (the
        runtime's variant picks faster routes for decode and prefill: `runtime.fused.FastExpertGroup`)."""
        return self.sorted_experts(x, ids, weights)

    def sorted_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       grouped: bool = False) -> torch.Tensor:  # fmt: skip
        """The sum with tokens sorted by expert: one grouped matmul, or one `expert` call per expert hit. Routes to
        an id >= num_experts are skipped: under transformers' expert parallelism a rank holds only some experts,
        and the routes to the others arrive with that id and weight 0."""
        k = ids.shape[1]
        flat, w = ids.reshape(-1), weights.reshape(-1)
        pair_token = torch.arange(flat.numel(), device=x.device) // k
        here = flat < self.num_experts
        if not bool(here.all()):
            flat, w, pair_token = flat[here], w[here], pair_token[here]
        order = flat.argsort(stable=True)
        token = pair_token[order]
        counts = torch.bincount(flat, minlength=self.num_experts)
        xs = x[token]
        if grouped:
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            ys = torch._grouped_mm((F.silu(gate) * up).contiguous(), self.down_proj.transpose(1, 2), offs=offs)
        else:
            ys = torch.empty_like(xs)
            start = 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    ys[start : start + c] = self.expert(e, xs[start : start + c]).to(ys.dtype)
                    start += c
        ys = ys.to(x.dtype) * w[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` (SwiGLU) on its rows."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H] routed by `self.gate` to experts ids [N, k] with weights [N, k] -> output [N, H]. The block
        routes, then calls this (the call transformers' expert parallelism takes over: `base_model_ep_plan`)."""
        return self.experts(x, ids, weights)


def _router(group: nn.Module) -> Router:
    """A group's router, also under adapter wrappers (PEFT's ParamWrapper keeps the group as `base_layer`)."""
    while not hasattr(group, "gate") and hasattr(group, "base_layer"):
        group = group.base_layer
    return group.gate


def _route_and_run(group: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's router, then the group (or its adapter wrapper) on the chosen experts: (output [N, H], router
    logits [N, E] fp32, chosen experts [N, k])."""
    logits, weights, ids = _router(group)(x)
    return group(x, ids, weights), logits, ids


class MoEBlock(nn.Module):
    """Shared experts for every token + each token's modality group (top-k of that group's experts)."""

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__()
        h = config.hidden_size
        self.groups = nn.ModuleDict(
            {
                g["name"]: ExpertGroup(h, g["num_experts"], g["intermediate_size"], config.moe_k, config.moe_norm_min)
                for g in config.expert_groups
            }
        )
        self.group_modalities = {g["name"]: tuple(g["modalities"]) for g in config.expert_groups}
        self.shared_experts = (
            SwiGLU(h, config.moe_shared_intermediate_size, config.use_bias) if config.moe_num_shared_experts else None
        )

    records: list | None = None  # what the last forward that collected decided, per group (see `forward`)

    def forward(
        self, x: torch.Tensor, modality: torch.Tensor | None = None, router_out: list | None = None
    ) -> torch.Tensor:
        """x [B, S, H]; modality [B, S] ids (None: all text).

        router_out: not None asks for ``(group, router logits, chosen experts, token rows, orthogonality)`` per
        group, for the training losses and the correction-bias update. They are kept on the module (`records`,
        which `DecoderStack` reads), not appended to the list: wrappers that rebuild a forward's arguments
        (DeepSpeed ZeRO-3's hooks) hand the layer a copy of the list, and what went there never reached the caller.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        found: list | None = [] if router_out is not None else None
        self.records = found
        if len(self.groups) == 1:
            (name, group), rows = next(iter(self.groups.items())), None
            y, logits, ids = _route_and_run(group, x)
            if found is not None:
                found.append((name, logits, ids, rows, _router(group).orthogonality()))
            return (out + y).reshape(shape)
        modality = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if modality is None else modality
        modality = modality.reshape(-1)
        for name, group in self.groups.items():
            rows = torch.isin(modality, torch.tensor(self.group_modalities[name], device=x.device)).nonzero()[:, 0]
            if rows.numel():
                y, logits, ids = _route_and_run(group, x[rows])
                out = out.index_add(0, rows, y.to(out.dtype))  # (autocast may give the shared path another dtype)
                if found is not None:
                    found.append((name, logits, ids, rows, _router(group).orthogonality()))
        return out.reshape(shape)
