"""Expert parallelism for inference: each rank of a process group keeps 1/N of every routed expert group's
experts; a layer's tokens (the same on every rank) are routed as before, each rank runs the (token, expert) pairs
whose expert it holds, and one all-reduce sums the ranks' outputs. Routers, attention, shared experts and the rest
stay whole on every rank.

    torchrun --nproc_per_node 2 app.py     # with model = ernie45.load(DIR, expert_shard=True)
                                           # (or ernie45.load(DIR) then shard_experts(model))

A 64-expert group over 8 ranks holds 8 experts a rank: most of an ERNIE MoE's weights are its experts, so each
rank holds about 1/8 of them. The logits equal one process's (tests/test_distributed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import ExpertGroup
from .fused import become
from .quant import QuantExpertGroup


class LocalExperts(ExpertGroup):
    """An expert group holding experts [first, first + held) of `num_experts`; the sum over every rank's part
    is the group's output."""

    first: int
    held: int
    process_group: object = None

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        mine = ((flat_ids >= self.first) & (flat_ids < self.first + self.held)).nonzero()[:, 0]
        local = flat_ids[mine] - self.first
        order = local.argsort(stable=True)
        pairs = mine[order]
        token = pairs // ids.shape[1]
        counts = torch.bincount(local, minlength=self.held).tolist()
        xs = x[token]
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate, up = F.linear(xs[start : start + c], self.gate_up_proj[e]).chunk(2, dim=-1)
                ys[start : start + c] = F.linear(F.silu(gate) * up, self.down_proj[e]).to(ys.dtype)
                start += c
        out = torch.zeros_like(x).index_add_(0, token, ys * flat_w[pairs, None].to(ys.dtype))
        torch.distributed.all_reduce(out, group=self.process_group)
        return out


def shard_experts(model: nn.Module, process_group=None) -> int:
    """Keep this rank's share of every routed expert group of `model` (in place; the dropped experts' memory is
    freed); returns how many groups were split. The group's expert count must divide by the ranks."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_experts: no process group (launch with torchrun and init_process_group first)")
    ranks = torch.distributed.get_world_size(process_group)
    rank = torch.distributed.get_rank(process_group)
    return split_experts(model, rank, ranks, process_group)


def split_experts(model: nn.Module, rank: int, ranks: int, process_group=None) -> int:
    """`shard_experts` for a given rank of `ranks` (also on a meta-device model: `ernie45.load(...,
    expert_shard=...)` splits the model before reading, so a rank never reads the experts it does not hold)."""
    done = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, ExpertGroup) or isinstance(module, (LocalExperts, QuantExpertGroup)):
            continue  # (quantized experts keep per-expert matrices: not split here)
        n = module.num_experts
        if n % ranks:
            raise ValueError(f"{name}: {n} experts do not split over {ranks} ranks")
        held = n // ranks
        first = rank * held
        part = become(LocalExperts, module, first=first, held=held, process_group=process_group)
        part.gate_up_proj = nn.Parameter(module.gate_up_proj.data[first : first + held].clone(), requires_grad=False)
        part.down_proj = nn.Parameter(module.down_proj.data[first : first + held].clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, part)
        done += 1
    return done
