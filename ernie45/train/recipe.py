"""A training run from one config (the YAML of `ernie45 train`): model, data, losses, parts to freeze,
LoRA, DPO, and transformers' TrainingArguments."""

from __future__ import annotations

import copy
import json
import logging
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from .. import presets
from ..checkpoint import load
from ..checkpoint.files import written_atomically
from ..model import Ernie45ForConditionalGeneration
from ..model.mtp import with_mtp
from ..processing.processor import load_processor
from ..runtime.quant import quantize, quantize_modules
from .data import load_samples
from .packing import collate_packed, collate_padded, pack, text_positions
from .plugins import SOURCES, TOKENIZER_OPTIONS, TOKENIZERS
from .trainer import DPOSettings, Ernie45Trainer, LossWeights, complete_checkpoints

log = logging.getLogger("ernie45.train")

DEFAULTS: dict[str, Any] = {
    "model": {"path": None, "preset": None, "overrides": {}, "tokenizer": None, "dtype": None,
              "split_numbers": False, "quantize": None, "mtp": 0, "reinit": []},
    "data": {"train": [], "kind": "chat", "loss_on": "assistant", "on_error": "skip", "pack": True,
             "max_tokens": 2048},
    "train": {"output_dir": "runs/ernie45", "max_steps": 100, "learning_rate": 1e-4, "batch_size": 1,
              "grad_accum": 1, "warmup_steps": 0, "lr_scheduler": "cosine", "weight_decay": 0.0, "seed": 0,
              "save_steps": 50, "logging_steps": 1, "bf16": False, "gradient_checkpointing": False,
              "max_grad_norm": 1.0, "encoder_lr_scale": 1.0,
              "encoder_freeze_steps": 0, "disable_tqdm": False, "ddp_find_unused_parameters": None, "fsdp": None,
              "fsdp_config": None, "deepspeed": None},
    "losses": {"load_balance": 0.0, "z_loss": 0.0, "orthogonal": 0.0, "token_balance_len": 0,
               "bias_update_rate": 0.0, "mtp": 0.0, "mtp_chain": 0.0},
    "freeze": [],
    "lora": None,
    "dpo": None,
}  # fmt: skip
FREEZABLE = ("vision", "audio", "experts", "router", "embeddings", "base")  # base: all but the MTP layers
DISTRIBUTED = ("ddp_find_unused_parameters", "fsdp", "fsdp_config", "deepspeed")  # TrainingArguments, as given


def check_keys(cfg: dict) -> None:
    """A recipe key that nothing reads is a typo that would silently do nothing: refuse it, naming the known ones."""
    for section, value in cfg.items():
        if section not in DEFAULTS:
            raise ValueError(f"recipe: unknown section {section!r}; known: {', '.join(DEFAULTS)}")
        known = DEFAULTS[section]
        if isinstance(known, dict) and isinstance(value, dict):
            extra = set(value) - set(known) - (set(SOURCES) if section == "data" else set())
            if extra:
                raise ValueError(f"recipe: unknown {section} keys {sorted(extra)}; known: {', '.join(known)}")


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model(cfg: dict, zero3: dict | None = None):
    """The model and processor a recipe names; zero3 (the Trainer's resolved DeepSpeed config): load partitioned."""
    q = _quantize_spec(cfg) if cfg["model"]["quantize"] else None
    if zero3 is not None and (q is not None or not cfg["model"].get("path")):
        raise ValueError("train.deepspeed ZeRO-3 loads a checkpoint partitioned layer by layer: give model.path (not "
                         "a preset) and no model.quantize")  # fmt: skip
    if q is not None and cfg["model"]["reinit"]:
        raise ValueError("model.reinit draws weights afresh to train them; a quantized base (model.quantize) is not "
                         "trained: drop one of the two")  # fmt: skip
    if zero3 is not None and cfg["model"]["reinit"]:
        raise ValueError("model.reinit draws whole weights; under DeepSpeed ZeRO-3 each rank holds a shard: run the "
                         "reinit on one process and save, then train from that checkpoint")  # fmt: skip
    model, processor = _model_and_processor(cfg["model"], cfg["train"], q, zero3)
    for option, apply in TOKENIZER_OPTIONS.items():  # e.g. split_numbers (saved with the model)
        if cfg["model"].get(option):
            log.info("%s: %d tokenizer changes", option, apply(processor.tokenizer))
    if q is not None:  # (a base loaded from a path is quantized layer by layer already; this does the rest)
        quantize(model, **q, progress=False)
    if cfg["model"]["reinit"]:
        reinit(model, cfg["model"]["reinit"], cfg["train"]["seed"])
    depths = cfg["model"]["mtp"]
    if depths and model.config.num_nextn_predict_layers != depths:  # `model.mtp: 1`: train an MTP layer for it
        if model.config.num_nextn_predict_layers:
            raise ValueError(f"model.mtp: {depths}, but the model has {model.config.num_nextn_predict_layers}")
        model = with_mtp(model, depths)
    for key in ("mtp", "mtp_chain"):
        if cfg["losses"][key] and not model.config.num_nextn_predict_layers:
            raise ValueError(f"losses.{key}: the model has no MTP layer; add `model: {{mtp: 1}}` to train one")
    return model, processor


def _quantize_spec(cfg: dict) -> dict:
    """`model.quantize: {bits: 4 | 8, group_size: 32, experts: true}`: the frozen base held as int4/int8 (LoRA only:
    its codes get no gradient), so the adapters of a model too large for memory in bf16 can still be trained.
    Each decoder layer is quantized as it is read: the float base never exists whole."""
    q = cfg["model"]["quantize"]
    q = {"bits": q} if isinstance(q, int) else dict(q)
    unknown = set(q) - {"bits", "group_size", "experts"}
    if unknown or q.get("bits") not in (4, 8):
        raise ValueError("model.quantize: {bits: 4 or 8, group_size: 32, experts: true}" +
                         (f"; unknown keys {sorted(unknown)}" if unknown else ""))  # fmt: skip
    if not cfg["lora"]:
        raise ValueError("model.quantize: a quantized base cannot be trained itself; add a `lora` section")
    return {"group_size": 32, "experts": True, **q}


def _model_and_processor(m: dict, train: dict, q: dict | None = None, zero3: dict | None = None):
    if m.get("path"):
        each = None if q is None else partial(quantize_modules, **q, progress=False)
        model = load(m["path"], dtype=m.get("dtype"), on_layer=each, zero3=zero3)
        return model, load_processor(m.get("tokenizer") or m["path"])
    if not m.get("preset") or not m.get("tokenizer"):
        raise ValueError("model: give `path` (a checkpoint), or `preset` plus `tokenizer` (a directory, or `demo`)")
    torch.manual_seed(train["seed"])
    config = presets.get(m["preset"], **m.get("overrides", {}))
    model = Ernie45ForConditionalGeneration(config)
    tokenizer_dir = m["tokenizer"]
    if tokenizer_dir in TOKENIZERS:  # a registered builder (the demo's: from its own text)
        tokenizer_dir = TOKENIZERS[tokenizer_dir](Path(train["output_dir"]) / "tokenizer")
    with written_atomically(tokenizer_dir) as tmp:  # every rank writes it; none reads a half-written file
        config.save_pretrained(tmp)  # the processor reads which encoders the model has
    return model, load_processor(tokenizer_dir)


REINITABLE = {"trunk": ("embed_tokens", "layers", "norm", "mtp_")}  # lm_head: tied, or drawn with the trunk


def reinit(model, parts: list[str], seed: int) -> None:
    """`model.reinit: [trunk]`: draw the decoder (embeddings, layers, final norm, output head, MTP layers) afresh
    from the config's initialiser, keeping the rest of a loaded checkpoint: trained encoders under a new trunk."""
    if isinstance(parts, str) or not set(parts) <= set(REINITABLE) or not parts:
        raise ValueError(f"model.reinit: a list of parts to draw afresh, from {sorted(REINITABLE)}; not {parts!r}")
    torch.manual_seed(seed)
    prefixes = tuple(p for part in parts for p in REINITABLE[part])
    for name, module in model.model.named_children():
        if name.startswith(prefixes):
            module.apply(model._init_weights)
    model.lm_head.apply(model._init_weights)  # (tied: the embeddings drawn once more)
    log.info("model.reinit: %s drawn afresh", ", ".join(parts))


def freeze(model, parts: list[str]) -> None:
    """Stop gradients to whole parts of the model (names from FREEZABLE)."""
    unknown = set(parts) - set(FREEZABLE)
    if unknown:
        raise ValueError(f"freeze: unknown parts {sorted(unknown)}; choose from {FREEZABLE}")
    for name, p in model.named_parameters():
        hit = (
            ("vision" in parts and (".vision_tower." in name or ".resampler_model." in name))
            or ("audio" in parts and (".audio_tower." in name or ".audio_resampler." in name))
            or ("experts" in parts and name.endswith(("gate_up_proj", "down_proj")) and ".groups." in name)
            or ("router" in parts and name.endswith("gate.weight"))
            or ("embeddings" in parts and "embed_tokens" in name)
            or ("base" in parts and ".mtp_" not in name)
        )
        if hit:
            p.requires_grad_(False)


def apply_lora(model, lora: dict):
    """LoRA adapters through PEFT on attention, shared experts and/or the routed experts: on a float base the
    stacked expert tensors (PEFT's target_parameters), on a quantized base each expert's int8 / int4 matrices
    (`q_gate_up.E`, `q_down.E`; `ernie45 merge` folds them into the float base)."""
    from peft import LoraConfig, get_peft_model

    from ..model.moe import ExpertGroup
    from ..runtime.quant import QuantExpertGroup

    targets = lora.get("targets", ["attention"])
    modules, params = [], []
    if "attention" in targets:
        modules += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if "shared_experts" in targets:
        modules += [r"shared_experts\.(gate|up|down)_proj"]
    groups = [isinstance(m, QuantExpertGroup) for m in model.modules() if isinstance(m, ExpertGroup)]
    if "experts" in targets and all(groups):
        modules += [r"q_gate_up\.\d+", r"q_down\.\d+"]
    elif "experts" in targets and any(groups):
        raise ValueError(
            "lora.targets: experts, but only some routed expert groups are quantized (int4 codes need "
            "widths that are multiples of 32); quantize at 8 bits or set model.quantize.experts: false"
        )
    elif "experts" in targets:
        params += ["gate_up_proj", "down_proj"]
    pattern = rf".*\.({'|'.join(modules)})" if modules else None  # a regex: PEFT matches it whole
    config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
                        target_modules=pattern, target_parameters=params or None)  # fmt: skip
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ..runtime.quant import QuantLinear

    config._register_custom_module({QuantLinear: LoraLinear})  # x W^T plus the adapters, as for nn.Linear
    with warnings.catch_warnings():  # PEFT warns it does not know QuantLinear; the mapping above tells it how
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        model = get_peft_model(model, config)
    for m in model.modules():
        if isinstance(m, QuantExpertGroup):
            m._decode_experts = False  # its int4 decode tiles are made again: adapted experts run their modules
    return model


def positions_for(model):
    """Per-sample position ids: 3D for media samples of a VL/omni model, 1D otherwise."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model

    def positions(sample, length):
        if not inner.config.freq_allocation:
            return text_positions(sample, length)
        grids = sample.media.get("image_grid_thw"), sample.media.get("video_grid_thw")
        if any(g is not None for g in grids):
            ids = torch.tensor([sample.input_ids[:length]])
            return inner.positions(ids, None, None, 0, length, "cpu", *grids)[:, 0]
        return text_positions(sample, length).expand(3, -1)  # 3D RoPE: text moves on all three axes

    return positions


def _deepspeed(config: dict | str) -> dict:
    """`train.deepspeed` (a dict or a JSON file) as the Trainer will use it. Under ZeRO-3 the final save needs the
    16-bit weights gathered onto the writing rank: without `stage3_gather_16bit_weights_on_model_save` the Trainer
    writes every tensor with shape [0] (and a warning), a model nothing can load. It is turned on when unset, and a
    recipe that turns it off is refused."""
    if isinstance(config, str):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"train.deepspeed: {config} is not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("train.deepspeed: a DeepSpeed config (a mapping, or the path of a JSON file)")
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ValueError("train.deepspeed: ZeRO-3 with stage3_gather_16bit_weights_on_model_save false would write "
                             "a final model of empty tensors; leave it out or set it true")  # fmt: skip
        config = {**config, "zero_optimization": {**zero, "stage3_gather_16bit_weights_on_model_save": True}}
    return config


def _sparse(model) -> bool:
    """Whether a batch can leave parameters without a gradient: a second expert group (or a media encoder) that
    a text-only batch never reaches. DDP must then look for unused parameters, which the Trainer turns off by
    default under gradient checkpointing ("Expected to have finished reduction in the prior iteration")."""
    config = getattr(model, "config", None)
    groups = getattr(config, "expert_groups", None) or []
    encoders = any(getattr(config, k, None) for k in ("vision_config", "audio_config"))
    return len(groups) > 1 or encoders


def build_trainer(cfg: dict) -> Ernie45Trainer:
    check_keys(cfg)
    cfg = merge(DEFAULTS, cfg)
    if cfg["train"]["fsdp"] and not torch.cuda.is_available():  # the Trainer would run plain DDP without a word
        raise ValueError("train.fsdp: transformers' Trainer shards with FSDP on GPUs only and falls back to DDP on "
                         "CPU; leave it out here (FSDP2 on CPU: apply torch's fully_shard yourself)")  # fmt: skip
    d, t = cfg["data"], cfg["train"]
    args = _arguments(t)  # first: under ZeRO-3 the load partitions each layer with the config the Trainer resolved
    ds = getattr(args, "hf_deepspeed_config", None)
    model, proc = build_model(cfg, zero3=ds.config if ds is not None and ds.is_zero3() else None)
    if t["ddp_find_unused_parameters"] is None and _sparse(model):
        args.ddp_find_unused_parameters = True
    torch.set_flush_denormal(True)  # saturated softmax tails otherwise slow CPU steps several-fold
    source = next((name for name in SOURCES if d.get(name)), None)  # a registered source (e.g. the demo's)
    if source is not None:
        samples = None
        if SOURCES[source].prepare is not None:
            SOURCES[source].prepare(model, proc, d[source], t["seed"])
    else:
        samples, problems = load_samples(proc, d["train"], d["kind"], d["loss_on"], d["on_error"], d["max_tokens"])
        if not samples:
            raise ValueError(f"no usable training samples in {d['train']} ({len(problems)} skipped)")
        log.info("%d samples (%d skipped)", len(samples), len(problems))
    freeze(model, cfg["freeze"])
    if (cfg["lora"] or {"router", "base"} & set(cfg["freeze"])) and cfg["losses"]["bias_update_rate"]:
        log.info("router frozen (LoRA or freeze: router / base): the correction-bias update is off")
        cfg["losses"]["bias_update_rate"] = 0.0
    ref_model = None
    if cfg["dpo"] and cfg["dpo"].get("reference", "model") == "model" and not cfg["lora"]:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg["lora"]:
        torch.manual_seed(t["seed"])  # the adapters' initialisation is the run's, not the process's
        model = apply_lora(model, cfg["lora"])
    if t["gradient_checkpointing"]:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    positions = positions_for(model)
    pad = proc.pad_id
    if samples is None:
        rows = t["max_steps"] * t["batch_size"] * t["grad_accum"]
        dataset = SOURCES[source].rows(proc, d[source], d["max_tokens"], rows, t["seed"])
        collator = lambda rows: collate_packed(rows, d["max_tokens"], pad, positions)  # noqa: E731
    elif d["pack"]:
        dataset = pack(samples, d["max_tokens"])
        collator = lambda rows: collate_packed(rows, d["max_tokens"], pad, positions)  # noqa: E731
    else:
        dataset = samples
        collator = lambda batch: collate_padded(batch, pad, positions)  # noqa: E731
    trainer = Ernie45Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        weights=LossWeights(**cfg["losses"]), dpo=DPOSettings(**cfg["dpo"]) if cfg["dpo"] else None,
        ref_model=ref_model, encoder_lr_scale=t["encoder_lr_scale"],
        encoder_freeze_steps=t["encoder_freeze_steps"],
    )  # fmt: skip
    trainer.processor = proc
    trainer.ernie45_config = cfg
    return trainer


def _arguments(t: dict) -> TrainingArguments:
    return TrainingArguments(
        output_dir=t["output_dir"], max_steps=t["max_steps"], learning_rate=t["learning_rate"],
        per_device_train_batch_size=t["batch_size"], gradient_accumulation_steps=t["grad_accum"],
        warmup_steps=t["warmup_steps"], lr_scheduler_type=t["lr_scheduler"], weight_decay=t["weight_decay"],
        seed=t["seed"], data_seed=t["seed"], save_steps=t["save_steps"], logging_steps=t["logging_steps"],
        bf16=t["bf16"], max_grad_norm=t["max_grad_norm"], remove_unused_columns=False, report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=t["disable_tqdm"],
        **{k: (_deepspeed(t[k]) if k == "deepspeed" else t[k]) for k in DISTRIBUTED if t[k] is not None},
    )  # fmt: skip


def run(cfg: dict, resume: bool = False) -> Path:
    """Train; returns the directory of the final model (with its tokenizer)."""
    trainer = build_trainer(cfg)
    out = Path(trainer.args.output_dir)
    checkpoint = None
    if resume:
        complete, incomplete = complete_checkpoints(out)
        newest = complete[-1] if complete else None
        skipped = [p.name for p in incomplete if newest is None or int(p.name[11:]) > int(newest.name[11:])]
        if newest is None:
            raise ValueError(f"--resume: no complete checkpoint-* in {out}" +
                             (f" ({', '.join(skipped)} were cut short while saving)" if skipped else ""))  # fmt: skip
        note = f" ({', '.join(skipped)} cut short while saving: skipped)" if skipped else ""
        print(f"ernie45 train: resuming from {newest}{note}", file=sys.stderr, flush=True)
        checkpoint = str(newest)
    trainer.train(resume_from_checkpoint=checkpoint)
    return save_final(trainer)


def save_final(trainer: Ernie45Trainer) -> Path:
    """Write the trained model with its tokenizer to OUTPUT_DIR/final (one writer; sharded weights gathered)."""
    final = Path(trainer.args.output_dir) / "final"
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA
        quantized = bool(trainer.ernie45_config["model"]["quantize"])  # (the merged recipe: every key is there)
        if not quantized:
            model = model.merge_and_unload()
        if trainer.is_world_process_zero():  # merged, or the adapters alone (PEFT's layout) for the float base
            model.save_pretrained(final)
            if quantized:
                print(f"ernie45 train: a quantized base was trained through LoRA; {final} holds the adapters. Fold "
                      f"them into the float base: ernie45 merge BASE {final} OUT", file=sys.stderr)  # fmt: skip
    else:  # the Trainer's save: gathers sharded (FSDP / ZeRO-3) weights, and only the main process writes
        trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        trainer.processor.save_pretrained(final)  # also makes it chat-ready (use_cache, end-of-turn ids)
    trainer.accelerator.wait_for_everyone()
    return final
