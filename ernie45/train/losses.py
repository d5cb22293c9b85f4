"""Training losses (docs/architecture.md §7): token-balanced cross-entropy, MoE load balance per expert group, router
z-loss and orthogonality, DPO, and the aux-loss-free correction-bias update."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..model.moe import Router

_ROUTER_NAME = re.compile(r"layers\.(\d+)\.mlp\.groups\.(\w+)\.(?:base_layer\.)*gate$")


def routers(model) -> dict[tuple[int, str], Router]:
    """(layer, group) -> router, also under wrappers (PEFT adapters, DDP)."""
    out = {}
    for name, module in model.named_modules():
        m = _ROUTER_NAME.search(name)
        if m and isinstance(module, Router):
            out[(int(m.group(1)), m.group(2))] = module
    return out


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, balance_len: int | None = None,
                  total: torch.Tensor | int | None = None) -> torch.Tensor:  # fmt: skip
    """Mean next-token CE over targets. With `balance_len` (token-balanced loss), the value is still the
    mean, but the gradient is sum / balance_len, so each sample's text weighs by its own length. With `total`
    (the targets of every micro-batch of the optimizer step, on every rank: the Trainer's `num_items_in_batch`)
    the mean is over all of them, so the micro-batches' losses add up to the step's mean."""
    flat = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="none")  # fmt: skip
    n = (labels[:, 1:] != -100).sum().clamp(min=1) if total is None else total
    mean = flat.sum() / n
    if not balance_len:
        return mean
    balanced = flat.sum() / balance_len
    return balanced - balanced.detach() + mean.detach()


def load_balance(logits: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style E * sum_e(mean prob_e * dispatch share_e); 1.0 for perfectly even routing."""
    probs = logits.float().softmax(-1).mean(0)
    share = torch.bincount(experts.reshape(-1), minlength=num_experts).float() / experts.numel()
    return num_experts * (probs * share).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), -1).pow(2).mean()


def real_tokens(router_out: list, valid: torch.Tensor | None) -> list:
    """The records with the padding's rows left out (`valid`: [B, T] True on real tokens; None: all are)."""
    if valid is None:
        return router_out
    flat = valid.reshape(-1).to(router_out[0].logits.device) if router_out else None
    out = []
    for r in router_out:
        keep = flat if r.rows is None else flat[r.rows]
        if keep.all():
            out.append(r)
        elif keep.any():
            rows = None if r.rows is None else r.rows[keep]
            out.append(r._replace(logits=r.logits[keep], experts=r.experts[keep], rows=rows))
    return out


def moe_losses(model, router_out: list, across_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Load balance, z-loss and orthogonality averaged over the (layer, group) entries of the forward.

    Everything is read from the forward's router records, never from the parameters afterwards: under FSDP2
    and ZeRO-3 a router's weight outside its forward is a shard.

    across_ranks: the statistics are the whole data-parallel batch's (dispatch shares and token counts summed
    over the ranks by one all-reduce), and each rank returns its share of the batch's loss, so that the ranks'
    values add up to what one process computes on the whole batch (the caller scales by the world size for
    DDP's averaging, as it does the LM loss). Per rank, a load-balance loss is a different number: a batch
    split over 2 ranks trained 1.07 above one process at weight 1.0."""
    if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        return _global_moe_losses(model, router_out)  # (every rank joins the all-reduce, records or not)
    if not router_out:
        return {}
    lb, z, orth = [], [], {}
    for record in router_out:  # model.moe.RouterRecord
        logits, experts = record.logits, record.experts
        lb.append(load_balance(logits, experts, logits.shape[-1]))
        z.append(z_loss(logits))
        orth.setdefault((record.layer, record.group), record.orthogonal)
    return {
        "load_balance": torch.stack(lb).mean(),
        "z_loss": torch.stack(z).mean(),
        "orthogonal": torch.stack(list(orth.values())).mean(),
    }


def _global_moe_losses(model, router_out: list) -> dict[str, torch.Tensor]:
    """`moe_losses` over every rank's tokens: one all-reduce of every router's dispatch counts and token count, in
    a fixed order whether or not this rank's tokens reached it (a rank with no image tokens has no record for
    the vision group, and must still take part)."""
    found = routers(model)
    keys = sorted(found)
    sizes = [_experts(model, k[1]) for k in keys]
    mine = {(r.layer, r.group): r for r in router_out}
    stats = []
    for key, n in zip(keys, sizes, strict=True):
        r = mine.get(key)
        counts = torch.zeros(n) if r is None else torch.bincount(r.experts.detach().reshape(-1).cpu(), minlength=n)
        tokens = 0.0 if r is None else float(r.logits.shape[0])
        stats += [counts.float(), torch.tensor([tokens, float(r is not None)])]  # dispatches, tokens, ranks
    device = router_out[0].logits.device if router_out else next(model.parameters()).device
    flat = torch.cat(stats).to(device)
    torch.distributed.all_reduce(flat)
    pieces = flat.split([x for n in sizes for x in (n, 2)])
    shares, totals = dict(zip(keys, pieces[0::2], strict=True)), dict(zip(keys, pieces[1::2], strict=True))
    present = [k for k in keys if totals[k][0] > 0]  # the (layer, group) pairs the whole batch reached
    lb, z, orth = [], [], []
    for key in present:
        r, (tokens, ranks) = mine.get(key), totals[key].clamp(min=1)
        if r is None:
            continue  # this rank adds nothing to that router's terms
        share = shares[key] / (shares[key].sum().clamp(min=1))
        probs = r.logits.float().softmax(-1).sum(0) / tokens  # this rank's part of the batch's mean probability
        lb.append(r.logits.shape[-1] * (probs * share).sum())
        z.append(torch.logsumexp(r.logits.float(), -1).pow(2).sum() / tokens)
        orth.append(r.orthogonal / ranks)  # the same on every rank that ran the group: each adds its part
    zero, n = flat.new_zeros(()).float(), max(len(present), 1)
    return {
        name: (torch.stack(v).sum() if v else zero) / n
        for name, v in (("load_balance", lb), ("z_loss", z), ("orthogonal", orth))
    }


def _experts(model, group: str) -> int:
    """A group's expert count from the config (under ZeRO-3 a router's own tensors are empty outside forward)."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return next(g["num_experts"] for g in config.expert_groups if g["name"] == group)


class BiasBalancer:
    """Aux-loss-free balancing: after each optimizer step, bias += rate * sign(mean usage - usage) per layer
    and group, usage = dispatch counts since the last step. The bias is never trained by gradient."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.usage: dict[tuple[int, str], torch.Tensor] = defaultdict(lambda: None)

    def accumulate(self, router_out: list) -> None:
        for record in router_out:
            layer, group, experts = record.layer, record.group, record.experts
            counts = torch.bincount(experts.detach().reshape(-1), minlength=record.logits.shape[-1]).float()
            prev = self.usage[(layer, group)]
            self.usage[(layer, group)] = counts if prev is None else prev + counts

    @torch.no_grad()
    def step(self, model) -> None:
        """Under data parallelism every rank sums the dispatch counts of all ranks first (one all-reduce over
        every router, in a fixed order, whether or not this rank's tokens reached it), so the bias, and with it
        the routing, stays the same on every replica."""
        if not self.rate:
            self.usage.clear()
            return
        found = routers(model)
        keys = sorted(found)
        counts = [self.usage.get(k) for k in keys]
        sizes = [_experts(model, k[1]) for k in keys]
        pieces = [c.float().cpu() if c is not None else torch.zeros(n) for c, n in zip(counts, sizes, strict=True)]
        flat = torch.cat(pieces)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = found[keys[0]].e_score_correction_bias.device if keys else "cpu"
            flat = flat.to(device)
            torch.distributed.all_reduce(flat)
        for key, usage in zip(keys, flat.split(sizes), strict=True):
            _add(found[key].e_score_correction_bias, self.rate * torch.sign(usage.mean() - usage))
        self.usage.clear()


def _add(bias: torch.Tensor, update: torch.Tensor) -> None:
    """bias += update, where the bias may be an FSDP2 shard or a ZeRO-3 partition (every rank has the same update)."""
    if hasattr(bias, "device_mesh"):  # an FSDP2 DTensor: each rank adds its shard's part of the update
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(update.to(bias.device, bias.dtype), bias.device_mesh, bias.placements)
        bias.to_local().add_(part.to_local())
    elif hasattr(bias, "ds_id"):  # ZeRO-3: gathered whole, changed, and partitioned again
        import deepspeed

        with deepspeed.zero.GatheredParameters([bias], modifier_rank=0):
            bias += update.to(bias.device, bias.dtype)
    else:
        bias += update.to(bias.device, bias.dtype)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, spans: list[tuple[int, int, int, int, int]]):
    """Summed token log-probs of each DPO pair's chosen and rejected answers -> (chosen [P], rejected [P]).

    In a packed row [prompt | chosen | rejected] the rejected answer's first token is predicted from the
    prompt's last position (as the chosen one's is), not from the chosen answer's end.
    """
    logp = torch.log_softmax(logits.float(), -1)
    chosen, rejected = [], []
    for b, c0, c1, r0, r1 in spans:
        ids = input_ids[b]
        chosen.append(logp[b, c0 - 1 : c1 - 1].gather(-1, ids[c0:c1, None]).sum())
        first = logp[b, c0 - 1, ids[r0]]
        rejected.append(first + logp[b, r0 : r1 - 1].gather(-1, ids[r0 + 1 : r1, None]).sum())
    return torch.stack(chosen), torch.stack(rejected)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: -log sigmoid(beta * (policy margin - reference margin)); returns (loss, reward margin)."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach().mean()
