"""`data.demo.copy_pretrain`: a short phase that teaches the trunk to copy from its context before the jobs.

Every job's answer copies something the prompt holds (a summary's sentences, a heard order number, a table's value,
a tool's result). Copying needs induction: find where the current token occurred earlier and predict the token
that followed it there. A model that never needed it does not grow it from answers alone, where a few copied
tokens hide among many that are not; a run of random tokens given twice, scored on the second run, rewards nothing
else, so the mechanism appears within a few hundred steps (docs in the model card, stage 28). Only the decoder
layers learn here: the embeddings and the output head stay as the chat data shaped them."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

log = logging.getLogger("ernie45.demo")


def _ordinary(tokenizer, length: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if len(ordinary) < 2 * length:
        raise ValueError(f"copy_pretrain: the tokenizer has {len(ordinary)} ordinary tokens; use length <= "
                         f"{len(ordinary) // 2}")  # fmt: skip
    return ordinary


def _second_run(model: nn.Module, ordinary: torch.Tensor, gen: torch.Generator, batch: int, length: int):
    """(logits, targets) over a batch of random runs given twice, on the second run after its first token."""
    run = ordinary[torch.randint(len(ordinary), (batch, length), generator=gen)]
    ids = torch.cat([run, run], dim=1)
    return model(input_ids=ids).logits[:, length:-1].float(), ids[:, length + 1 :]


@torch.no_grad()
def copy_score(model: nn.Module, tokenizer, batch: int = 32, length: int = 24, seed: int = 0) -> float:
    """Top-1 accuracy on the second of two identical random runs: about 0 for a model that cannot copy from its
    context, near 1 for one that can."""
    was_training = model.training
    model.eval()
    logits, target = _second_run(model, _ordinary(tokenizer, length), torch.Generator().manual_seed(seed), batch,
                                 length)  # fmt: skip
    model.train(was_training)
    return float((logits.argmax(-1) == target).float().mean())


def pretrain_copying(model: nn.Module, tokenizer, steps: int, batch: int = 16, length: int = 24, lr: float = 1e-3,
                     seed: int = 0, log_every: int = 50) -> dict[str, float]:  # fmt: skip
    """Train `model`'s decoder layers in place for `steps` steps on `batch` runs of `length` random ordinary
    tokens (none of the tokenizer's special ids), each given twice; the loss is on the second run after its first
    token. Returns the last step's loss and top-1 accuracy ("copied")."""
    if steps < 1 or batch < 1 or length < 2:
        raise ValueError(f"copy_pretrain: steps, batch >= 1 and length >= 2, not {steps}, {batch}, {length}")
    ordinary = _ordinary(tokenizer, length)
    gen = torch.Generator().manual_seed(seed)
    layers = [p for n, p in model.named_parameters() if ".layers." in n and p.requires_grad]
    opt = torch.optim.AdamW(layers, lr=lr, weight_decay=0.01)
    warm = min(20, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    stats: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        logits, target = _second_run(model, ordinary, gen, batch, length)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layers, 1.0)
        opt.step()
        sched.step()
        stats = {"loss": loss.item(), "copied": float((logits.argmax(-1) == target).float().mean())}
        if (step + 1) % log_every == 0 or step + 1 == steps:
            eta = (time.perf_counter() - start) / (step + 1) * (steps - step - 1)
            log.info("copying %d/%d loss %.3f copied %.0f%% (eta %.0fs)", step + 1, steps, stats["loss"],
                     100 * stats["copied"], eta)  # fmt: skip
    model.zero_grad(set_to_none=True)
    return stats
