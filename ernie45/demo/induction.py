"""`data.demo.copy_pretrain`: a phase on copying from the context, and `copy_score`, which measures that skill.

Every job's answer copies something the prompt holds (a summary's sentences, a heard order number, a table's value,
a tool's result). Copying needs induction: find where the current token occurred earlier and predict the token
that followed it there. The phase gives the trunk runs of random tokens twice, scored on the second run, which
only that mechanism gets right. The mechanism takes two heads in two layers (one that looks at the previous token,
one that finds the current token's earlier place through it), and neither helps the loss before the other exists:
a demo-sized trunk sat on that plateau for 1,000+ steps, or for good. `guide` steps pull one head of each of the
first two decoder layers toward its half of the circuit: a fresh 2-layer trunk then copies in 300 steps; the
6-layer demo trunk does only with its later layers held at the identity meanwhile (`hold`; model card).
`benchmarks/copying.py` runs the phase guided and unguided on fresh models of any shape."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .encoders import _accuracy

log = logging.getLogger("ernie45.demo")
IGNORE = -100
GUIDE_WEIGHT = 0.1  # at 1 the guidance's gradients outgrew the clip and starved the copying loss itself


def _ordinary(tokenizer, length: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if len(ordinary) < 4 * length:
        raise ValueError(f"copy_pretrain: the tokenizer has {len(ordinary)} ordinary tokens; use length <= "
                         f"{len(ordinary) // 4}")  # fmt: skip
    return ordinary


def _runs_twice(ordinary: torch.Tensor, gen: torch.Generator, batch: int, length: int, spread: float = 1.0):
    """(ids, target, source), each [batch, 3 * length + 8]: random tokens ending in a run given twice.

    Each row draws its own run length (length/2 to length), gap between the copies (0 to 8) and so its own
    distance back: with one distance for a whole batch a model learns "look that far back" for a few batches and
    is confidently wrong on the next (that loss climbed above chance's), and a position rule copies nothing in a
    chat. `spread` 0 puts every copy `length` back (one distance); in between the ranges shrink toward it. `target`
    is the next token on the second run after its first token (IGNORE elsewhere); `source` is where that token
    stands in the first copy: where an induction head looks."""
    total = 3 * length + 8
    ids = ordinary[torch.randint(len(ordinary), (batch, total), generator=gen)]
    target = torch.full((batch, total), IGNORE)
    source = torch.full((batch, total), IGNORE)
    for row in range(batch):
        lo = length // 2 + round((1 - spread) * (length - length // 2))
        n = int(torch.randint(max(2, lo), length + 1, (), generator=gen))
        gap = int(torch.randint(0, round(8 * spread) + 1, (), generator=gen))
        second = total - n
        first = second - gap - n
        ids[row, second:] = ids[row, first : first + n]
        target[row, second : total - 1] = ids[row, second + 1 :]
        source[row, second : total - 1] = torch.arange(first + 1, first + n)
    return ids, target, source


def _copied(logits: torch.Tensor, target: torch.Tensor) -> float:
    scored = target != IGNORE
    return _accuracy(logits[scored], target[scored])


@torch.no_grad()
def copy_score(model: nn.Module, tokenizer, batch: int = 32, length: int = 24, seed: int = 0) -> float:
    """Top-1 accuracy on the second of two identical random runs: about 0 for a model that cannot copy from its
    context, near 1 for one that can (by finding the token's earlier place, not by looking back a fixed distance)."""
    was_training = model.training
    model.eval()
    ids, target, _ = _runs_twice(_ordinary(tokenizer, length), torch.Generator().manual_seed(seed), batch, length)
    logits = model(input_ids=ids).logits
    model.train(was_training)
    return _copied(logits, target)


@contextmanager
def _head_zero(model: nn.Module):
    """While active, the log-softmax attention [B, S, S] of head 0 in decoder layers 0 and 1 (plain causal
    attention over the whole row), by layer, in the dict it yields, filled by each training forward."""
    layers = model.model.layers
    if len(layers) < 2:
        raise ValueError(f"copy_pretrain: guide needs at least 2 decoder layers; this model has {len(layers)}")
    seen: dict = {}
    attns = [layers[i].self_attn for i in (0, 1)]

    def recording(attn, plain):
        def attend(q, k, v, mask):
            s = q.shape[2]
            logits = (q[:, 0] @ k[:, 0].transpose(-1, -2)) * attn.head_dim**-0.5
            future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            seen[attn.layer_idx] = logits.float().masked_fill(future, float("-inf")).log_softmax(-1)
            return plain(q, k, v, mask)

        return attend

    for attn in attns:
        attn.attend = recording(attn, attn.attend)
    try:
        yield seen
    finally:
        for attn in attns:
            del attn.attend  # back to the class's method


def _guidance(seen: dict, source: torch.Tensor) -> dict[str, torch.Tensor]:
    """The circuit's two halves, one cross-entropy each: layer 0's head 0 attends to the previous token (every
    position after the first: "previous"), layer 1's to `source`, the token after the current one's earlier place
    ("found"). What the found token's head then writes is left to the copying loss."""
    b, s = source.shape
    previous = torch.arange(s - 1).expand(b, -1)
    nll = nn.functional.nll_loss
    return {"previous": nll(seen[0][:, 1:].reshape(-1, s), previous.reshape(-1)),
            "found": nll(seen[1].reshape(-1, s), source.reshape(-1))}  # fmt: skip


@torch.no_grad()
def _at_identity(model: nn.Module, first: int) -> list[nn.Parameter]:
    """Zero what decoder layers `first`.. add to the residual stream (attention output, every MLP's down
    projection: dense, experts and shared experts), freeze their trainable parameters and return them."""
    held = []
    for layer in model.model.layers[first:]:
        for name, p in layer.named_parameters():
            if name.startswith("self_attn.o_proj.") or "down_proj" in name:
                p.zero_()
            if p.requires_grad:
                held.append(p.requires_grad_(False))
    return held


def pretrain_copying(model: nn.Module, tokenizer, steps: int, batch: int = 16, length: int = 24, lr: float = 1e-3,
                     widen: float = 0.0, everything: bool = False, cosine: bool = True, guide: int = 0,
                     hold: int = 0, seed: int = 0, log_every: int = 50) -> dict[str, float]:  # fmt: skip
    """Train `model`'s decoder layers in place for `steps` steps on `batch` rows of random ordinary tokens (none
    of the tokenizer's special ids) that end in a run of up to `length` given twice; the loss is on the second run
    after its first token. With `widen` > 0 the runs start at one fixed distance apart and the distances widen to
    their full range over that share of the steps. With `everything` the embeddings and the final norm learn too
    (a fresh model's). `cosine` False keeps the rate constant after the warm-up. For the first `guide` steps head
    0 of decoder layers 0 and 1 is also pulled toward the two halves of the induction circuit (module docstring).
    With `hold` > 0 the decoder layers from index `hold` on start at the identity (their attention output and MLP
    down projections zeroed: what they had learned is gone, so this is for a fresh trunk) and hold still for the
    guided steps, so that the first layers' circuit is all the model has; then they train too.
    Returns the last step's loss and top-1 accuracy ("copied")."""
    if steps < 1 or batch < 1 or length < 2 or guide < 0 or widen < 0:
        raise ValueError(f"copy_pretrain: steps, batch >= 1, length >= 2, guide and widen >= 0, not {steps}, "
                         f"{batch}, {length}, {guide}, {widen}")  # fmt: skip
    if hold and not (guide and 2 <= hold < len(model.model.layers)):
        raise ValueError(f"copy_pretrain: hold {hold} holds the layers from that index on during the guided steps: "
                         f"give guide > 0 and hold from 2 to {len(model.model.layers) - 1}")  # fmt: skip
    ordinary = _ordinary(tokenizer, length)
    gen = torch.Generator().manual_seed(seed)
    trunk = (".layers.", "embed_tokens", "model.norm.") if everything else (".layers.",)
    layers = [p for n, p in model.named_parameters() if any(k in n for k in trunk) and p.requires_grad]
    held = _at_identity(model, hold) if hold else []
    opt = torch.optim.AdamW(layers, lr=lr, weight_decay=0.01)
    warm = min(20, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))) if cosine else 1)
    )
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    with ExitStack() as guiding:
        seen = guiding.enter_context(_head_zero(model)) if guide else {}
        for step in range(steps):
            if step == guide:
                guiding.close()  # the plain layers from here on
                for p in held:
                    p.requires_grad_(True)
            spread = min(1.0, step / (steps * widen)) if widen > 0 else 1.0
            ids, target, source = _runs_twice(ordinary, gen, batch, length, spread)
            logits = model(input_ids=ids).logits.float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            parts = _guidance(seen, source) if step < guide else {}
            guided = GUIDE_WEIGHT * sum(parts.values()) if parts else None
            opt.zero_grad(set_to_none=True)
            (loss if guided is None else loss + guided).backward()
            torch.nn.utils.clip_grad_norm_(layers, 1.0)
            opt.step()
            sched.step()
            stats = {"loss": loss.item(), "copied": _copied(logits, target)}
            stats.update({f"guide_{k}": v.item() for k, v in parts.items()})
            if (step + 1) % log_every == 0 or step + 1 == steps:
                eta = (time.perf_counter() - start) / (step + 1) * (steps - step - 1)
                extra = "".join(f" {k} {v.item():.2f}" for k, v in parts.items())
                log.info("copying %d/%d loss %.3f copied %.0f%%%s (eta %.0fs)", step + 1, steps, stats["loss"],
                         100 * stats["copied"], extra, eta)  # fmt: skip
    for p in held:  # (guide >= steps: released here)
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return stats
