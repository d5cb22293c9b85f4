"""`data.demo.copy_pretrain`: a phase on copying from the context, and `copy_score`, which measures that skill.

Every job's answer copies something the prompt holds (a summary's sentences, a heard order number, a table's value,
a tool's result). Copying needs induction: find where the current token occurred earlier and predict the token
that followed it there. The phase gives the trunk runs of random tokens twice, scored on the second run, which
only that mechanism gets right; what it did for the demo model is in the model card (stages 27-28). By default
only the decoder layers learn: the embeddings and the output head stay as the chat data shaped them.
`benchmarks/copying.py` runs the phase on a fresh model of any shape."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from .encoders import _accuracy

log = logging.getLogger("ernie45.demo")


def _ordinary(tokenizer, length: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if len(ordinary) < 4 * length:
        raise ValueError(f"copy_pretrain: the tokenizer has {len(ordinary)} ordinary tokens; use length <= "
                         f"{len(ordinary) // 4}")  # fmt: skip
    return ordinary


def _second_run(model: nn.Module, ordinary: torch.Tensor, gen: torch.Generator, batch: int, length: int,
                spread: float = 1.0):  # fmt: skip
    """(logits, targets) over a batch of random runs given twice, on the second run after its first token.

    With `spread` 1 the run's length (length/2 to length), the random tokens before it (0 to length) and between
    its two copies (0 to 8) change from batch to batch, so the second copy is not a fixed distance behind the
    first: at a fixed distance a model learns to look back that far (a position rule that copies nothing in a
    chat), not to find the current token's earlier place and take the one after it. `spread` 0 is that fixed
    distance; in between, the ranges shrink toward it."""

    def draw(n: int) -> torch.Tensor:
        return ordinary[torch.randint(len(ordinary), (batch, n), generator=gen)]

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, lo + round(spread * (hi - lo)) + 1, (), generator=gen))

    n = length - pick(0, length - max(2, length // 2))
    run = draw(n)
    ids = torch.cat([draw(pick(0, length)), run, draw(pick(0, 8)), run], dim=1)
    start = ids.shape[1] - n  # where the second copy begins
    return model(input_ids=ids).logits[:, start:-1].float(), ids[:, start + 1 :]


@torch.no_grad()
def copy_score(model: nn.Module, tokenizer, batch: int = 32, length: int = 24, seed: int = 0) -> float:
    """Top-1 accuracy on the second of two identical random runs: about 0 for a model that cannot copy from its
    context, near 1 for one that can (by finding the token's earlier place, not by looking back a fixed distance)."""
    was_training = model.training
    model.eval()
    logits, target = _second_run(model, _ordinary(tokenizer, length), torch.Generator().manual_seed(seed), batch,
                                 length)  # fmt: skip
    model.train(was_training)
    return _accuracy(logits, target)


def pretrain_copying(model: nn.Module, tokenizer, steps: int, batch: int = 16, length: int = 24, lr: float = 1e-3,
                     widen: float = 0.5, everything: bool = False, cosine: bool = True, seed: int = 0,
                     log_every: int = 50) -> dict[str, float]:  # fmt: skip
    """Train `model`'s decoder layers in place for `steps` steps on `batch` runs of up to `length` random
    ordinary tokens (none of the tokenizer's special ids), each given twice; the loss is on the second run after its
    first token. The runs start at one fixed distance apart (a position rule learns them) and the distances widen
    to their full range over the first `widen` share of the steps (0: the full range from the start). With
    `everything` the embeddings and the final norm learn too (a fresh model's). `cosine` False keeps the rate
    constant after the warm-up: induction comes as a sudden change late in the phase, which a decayed rate can
    miss. Returns the last step's loss and top-1 accuracy ("copied")."""
    if steps < 1 or batch < 1 or length < 2:
        raise ValueError(f"copy_pretrain: steps, batch >= 1 and length >= 2, not {steps}, {batch}, {length}")
    ordinary = _ordinary(tokenizer, length)
    gen = torch.Generator().manual_seed(seed)
    trunk = (".layers.", "embed_tokens", "model.norm.") if everything else (".layers.",)
    layers = [p for n, p in model.named_parameters() if any(k in n for k in trunk) and p.requires_grad]
    opt = torch.optim.AdamW(layers, lr=lr, weight_decay=0.01)
    warm = min(20, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))) if cosine else 1)
    )
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        spread = min(1.0, step / max(1, steps * widen))
        logits, target = _second_run(model, ordinary, gen, batch, length, spread)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layers, 1.0)
        opt.step()
        sched.step()
        stats = {"loss": loss.item(), "copied": _accuracy(logits, target)}
        if (step + 1) % log_every == 0 or step + 1 == steps:
            eta = (time.perf_counter() - start) / (step + 1) * (steps - step - 1)
            log.info("copying %d/%d loss %.3f copied %.0f%% (eta %.0fs)", step + 1, steps, stats["loss"],
                     100 * stats["copied"], eta)  # fmt: skip
    model.zero_grad(set_to_none=True)
    return stats
