"""ernie45 on transformers' Trainer: the MoE losses, DPO, the correction-bias update and progress lines.

Everything else -- mixed precision, gradient checkpointing, accelerate / FSDP / DeepSpeed, checkpoints
and exact resume (model, optimizer, scheduler, RNG, data position) -- is the Trainer's own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..model.trunk import ENCODER_MODULES
from .losses import BiasBalancer, cross_entropy, dpo_loss, moe_losses, real_tokens, sequence_logps


@dataclass
class LossWeights:
    load_balance: float = 0.0
    z_loss: float = 0.0
    orthogonal: float = 0.0
    token_balance_len: int = 0  # > 0: token-balanced CE with this constant length
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (0: off)
    mtp: float = 0.0  # the multi-token-prediction layer's loss (the token after next), where the model has one
    mtp_chain: float = 0.0  # the same layer run MTP_CHAIN more times on its own output (the engine's chained drafts)


MTP_CHAIN = 3  # chained passes the `mtp_chain` loss trains: drafts 2-4 of `num_speculative_tokens` 4


@dataclass
class DPOSettings:
    beta: float = 0.1
    reference: str = "model"  # "model": a frozen copy (or the base under LoRA); "precomputed": from the data


class Ernie45Trainer(Trainer):
    def __init__(self, *args, weights: LossWeights | None = None, dpo: DPOSettings | None = None,
                 ref_model=None, encoder_lr_scale: float = 1.0, encoder_freeze_steps: int = 0,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.encoder_lr_scale = encoder_lr_scale
        self.encoder_freeze_steps = encoder_freeze_steps
        self._encoder_groups: list[int] = []
        self.weights = weights or LossWeights()
        self.dpo = dpo
        self.ref_model = ref_model
        self.balancer = BiasBalancer(self.weights.bias_update_rate)
        self._parts: dict[str, float] = {}
        self._count = 0
        self.tokens_seen = 0
        self._clock = _StepEnd(self)
        self.add_callback(self._clock)

    def create_optimizer(self, *args, **kwargs):
        """AdamW as the Trainer builds it, with the media encoders and resamplers at `encoder_lr_scale` x lr."""
        if (self.encoder_lr_scale == 1.0 and not self.encoder_freeze_steps) or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        encoder = ENCODER_MODULES
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                decay = p.dim() >= 2 and "norm" not in name
                groups.setdefault((any(e in name for e in encoder), decay), []).append(p)
        lr, wd = self.args.learning_rate, self.args.weight_decay
        params = [{"params": ps, "lr": lr * (self.encoder_lr_scale if enc else 1.0), "weight_decay": wd if dec else 0.0}
                  for (enc, dec), ps in groups.items()]  # fmt: skip
        self._encoder_groups = [i for i, (enc, _) in enumerate(groups) if enc]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                           eps=self.args.adam_epsilon)  # fmt: skip
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule; the encoder groups hold at lr 0 for `encoder_freeze_steps` first.

        Training a fresh ViT/audio encoder from the first step collapses its outputs towards one vector (the
        trunk ignores them at first, so their gradient only says "be a useful constant"); random encoders
        already separate colour, shape and sound, so the trunk first learns to read them as they are.
        """
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        hold = self.encoder_freeze_steps
        if hold and self._encoder_groups and hasattr(scheduler, "lr_lambdas"):
            for i in self._encoder_groups:
                scheduler.lr_lambdas[i] = _held(scheduler.lr_lambdas[i], hold)
            for i in self._encoder_groups:  # LambdaLR applied the unheld factor at construction
                scheduler.optimizer.param_groups[i]["lr"] = 0.0
        return scheduler

    def _is_moe(self, model) -> bool:
        return bool(getattr(_base_config(model), "expert_groups", None))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        spans = inputs.pop("answer_spans", None)
        ref_logps = inputs.pop("ref_logps", None)
        valid = inputs.pop("token_mask", None)  # the padding stays out of the MoE statistics
        moe = self._is_moe(model)
        chain = MTP_CHAIN if self.weights.mtp_chain else 0
        extra = {"output_mtp_chain": chain} if chain else {}
        out = model(**inputs, output_router_logits=moe, output_mtp_logits=bool(self.weights.mtp), **extra)
        parts: dict[str, torch.Tensor] = {}
        # The Trainer leaves a loss undivided by the accumulation steps when it handed over `num_items_in_batch`
        # (the step's target count, summed over micro-batches and, by default, ranks): the LM loss is then that
        # count's share, the per-micro-batch means (DPO, the MoE terms) are divided here. Under data parallelism
        # the LM loss and the MoE terms are this rank's share of the whole batch's, scaled by the ranks that DDP
        # averages over, so accumulation and data parallelism give one process's numbers. (DPO stays a mean over
        # this rank's pairs: DDP's average of the ranks' means is the batch's mean.)
        per_step = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        steps = (getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
                 if per_step else 1)  # fmt: skip
        shared = per_step and self.args.average_tokens_across_devices and self.args.world_size > 1
        scale = self.args.world_size if shared else 1
        if self.dpo is not None and spans:
            chosen, rejected = sequence_logps(out.logits, inputs["input_ids"], spans)
            ref_c, ref_r = self._reference(model, inputs, spans, ref_logps)
            loss, margin = dpo_loss(chosen, rejected, ref_c, ref_r, self.dpo.beta)
            parts["dpo_margin"], parts["lm_loss"] = margin, loss.detach()
            loss = loss / steps
        else:
            total = num_items_in_batch if per_step else None
            loss = cross_entropy(out.logits, labels, self.weights.token_balance_len or None, total)
            local = (labels[:, 1:] != -100).sum().clamp(min=1)
            parts["lm_loss"] = loss.detach() * (total / local if per_step else 1)  # this micro-batch's mean
            loss = loss * scale
        if self.weights.mtp:  # slot i predicts the token at i + 2
            mtp = cross_entropy(out.mtp_logits[:, :-1], labels[:, 1:], None, None)
            parts["mtp_loss"] = mtp.detach()
            loss = loss + self.weights.mtp * mtp * scale / steps
        if chain:  # pass j's slot i predicts the token at i + 2 + j
            terms = [cross_entropy(lg[:, : -1 - j], labels[:, 1 + j :], None, None)
                     for j, lg in enumerate(out.mtp_chain_logits, start=1)]  # fmt: skip
            mean = torch.stack(terms).mean()
            parts["mtp_chain_loss"] = mean.detach()
            loss = loss + self.weights.mtp_chain * mean * scale / steps
        if moe and (out.router_logits or shared):
            records = real_tokens(out.router_logits or [], valid)
            self.balancer.accumulate(records)
            terms = moe_losses(_unwrap(model), records, across_ranks=shared)
            if shared:  # logged: the whole batch's values (the ranks' shares summed)
                logged = torch.stack([v.detach() for v in terms.values()])
                torch.distributed.all_reduce(logged)
                parts.update(zip(terms, logged, strict=True))
            for name, value in terms.items():
                parts.setdefault(name, value.detach())
                weight = getattr(self.weights, name)
                if weight:
                    loss = loss + weight * value * scale / steps
        self._record(parts)
        self.tokens_seen += int((inputs["input_ids"] != (_base_config(model).pad_token_id or 0)).sum())
        return (loss, out) if return_outputs else loss

    @torch.no_grad()
    def _reference(self, model, inputs, spans, ref_logps):
        if self.dpo.reference == "precomputed":
            if ref_logps is None:
                raise ValueError("dpo.reference is 'precomputed' but the data has no ref_chosen / ref_rejected")
            return ref_logps[:, 0], ref_logps[:, 1]
        if self.ref_model is not None:
            ref_out = self.ref_model(**inputs)
        else:  # LoRA: the base model without its adapters is the reference
            with _unwrap(model).disable_adapter():
                ref_out = model(**inputs)
        return sequence_logps(ref_out.logits, inputs["input_ids"], spans)

    def _record(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self._parts[k] = self._parts.get(k, 0.0) + float(v)
        self._count += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._count and "loss" in logs:
            logs.update({k: round(v / self._count, 6) for k, v in self._parts.items()})
            self._parts, self._count = {}, 0
            clock = self._clock
            if clock.start is not None:
                elapsed = time.perf_counter() - clock.start
                done = max(self.state.global_step - clock.start_step, 1)
                logs["tokens_per_s"] = round(self.tokens_seen / max(elapsed, 1e-9), 1)
                logs["eta_s"] = round(elapsed / done * (self.state.max_steps - self.state.global_step), 1)
        super().log(logs, *args, **kwargs)


def _held(inner, steps: int):
    """An lr factor that is 0 for the first `steps` steps, then the wrapped schedule's.

    A plain function (not an object): LambdaLR saves nothing of it, so checkpoints stay loadable with
    torch.load(weights_only=True) and a resumed run rebuilds it from the config.
    """

    def factor(step: int) -> float:
        return 0.0 if step < steps else inner(step)

    return factor


class _StepEnd(TrainerCallback):
    """After each optimizer step: the correction-bias update; keeps the clock for tokens/s and ETA."""

    def __init__(self, trainer: Ernie45Trainer) -> None:
        self.trainer = trainer
        self.start = None
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self.start, self.start_step, self.start_tokens = time.perf_counter(), state.global_step, 0
        self.trainer.tokens_seen = 0

    def on_step_end(self, args, state, control, **kw):
        self.trainer.balancer.step(_unwrap(self.trainer.model))

    def on_save(self, args, state, control, **kw):
        """The checkpoint is whole (model, optimizer, RNG, trainer state, and the processor, so that `LLM(folder)`
        reads pictures at the size they were trained at): mark it, so a resume never takes one that a kill
        interrupted mid-save."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            processor = getattr(self.trainer, "processor", None)
            if processor is not None:  # the tokenizer and the media sizes trained at: a checkpoint loads as it is
                processor.save_pretrained(folder)
            (folder / COMPLETE).write_text(json.dumps({"step": state.global_step}))


COMPLETE = "ernie45-complete.json"  # written into a checkpoint folder once everything in it is saved


def complete_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) `checkpoint-N` folders of a run, oldest first. Complete: marked by `on_save`, or
    (a run from before the mark) holding the trainer state the Trainer writes last."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and p.is_dir()]
    found.sort(key=lambda p: int(p.name.split("-", 1)[1]))
    complete = [p for p in found if (p / COMPLETE).is_file() or (p / "trainer_state.json").is_file()]
    return complete, [p for p in found if p not in complete]


def _unwrap(model):
    return getattr(model, "module", model)


def _base_config(model):
    m = _unwrap(model)
    return getattr(m, "config", None)
