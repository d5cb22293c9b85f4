"""How much accelerator memory a LoRA run on a quantized base takes, from the config alone (the model is built on
the meta device): the frozen codes, the float parts, the adapters with their gradients and Adam state, and the
activations under gradient checkpointing. `docs/distributed.md` shows it for ERNIE-4.5-21B-A3B on a 24 GB GPU.

    python -m ernie45.train.memory ernie-4.5-21b-a3b --bits 4 --rank 16 --seq 4096
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..checkpoint.load import build_on_meta
from ..config import Ernie45Config
from ..model.moe import ExpertGroup
from ..model.trunk import ENCODER_MODULES

FLOAT_KEEP = ("norm", "embed_tokens", "gate.weight", "e_score_correction_bias", "bias")
SHARED = ("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")
LORA_TARGETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "shared_experts": SHARED, "experts": ()}


@dataclass
class Estimate:
    codes: float  # bytes of the quantized weights (codes + scales)
    floats: float  # embeddings, norms, routers (bf16; routers fp32)
    adapters: float  # LoRA weights, gradients and AdamW moments (fp32)
    activations: float  # checkpointed layer inputs + one layer recomputed + the logits of the loss
    overhead: float = 1.0 * 2**30  # CUDA context, allocator slack

    @property
    def total(self) -> float:
        return self.codes + self.floats + self.adapters + self.activations + self.overhead

    def table(self) -> str:
        rows = [("quantized weights", self.codes), ("float parts", self.floats),
                ("LoRA + grads + AdamW", self.adapters), ("activations", self.activations),
                ("CUDA context, slack", self.overhead), ("total", self.total)]  # fmt: skip
        return "\n".join(f"{name:24} {v / 2**30:7.2f} GiB" for name, v in rows if v)


def weight_bytes(config: Ernie45Config, bits: int, group_size: int = 32) -> tuple[float, float]:
    """(quantized bytes, float bytes) of a bf16 text model at `bits` (what `runtime.quant.quantize` keeps: int8 codes
    and one bf16 scale a row; int4 codes two to a byte and a bf16 scale + zero a group of `group_size`)."""
    model = build_on_meta(config)
    codes = floats = 0.0
    for name, p in model.named_parameters():
        if name.startswith("model.") and name.split(".")[1] in ENCODER_MODULES:
            continue  # the media encoders are not part of a text fine-tune's base
        if p.dim() < 2 or any(k in name for k in FLOAT_KEEP):
            floats += p.numel() * (4 if "gate.weight" in name or "correction" in name else 2)
            continue
        rows, width = p.numel() // p.shape[-1], p.shape[-1]
        if p.dim() == 3:  # stacked experts [E, out, in] (or [E, in, out]): per expert, per row
            rows, width = p.shape[0] * p.shape[1], p.shape[2]
        if bits == 8:
            codes += p.numel() + rows * 2
        else:
            codes += p.numel() / 2 + rows * (width // group_size) * 4
    return codes, floats  # (a tied head is the embedding: named_parameters lists it once)


def lora_params(config: Ernie45Config, rank: int, targets: tuple[str, ...] = ("attention",)) -> int:
    model = build_on_meta(config)
    suffixes = tuple(s for t in targets for s in LORA_TARGETS[t])
    n = 0
    for name, module in model.named_modules():
        if name.endswith(suffixes) and hasattr(module, "in_features") and ".layers." in name:
            n += rank * (module.in_features + module.out_features)
        if "experts" in targets and isinstance(module, ExpertGroup):  # one adapter per expert matrix
            e, out2, h = module.gate_up_proj.shape
            n += e * rank * ((h + out2) + (out2 // 2 + h))
    return n


def estimate(config: Ernie45Config, bits: int = 4, group_size: int = 32, rank: int = 16,
             targets: tuple[str, ...] = ("attention", "shared_experts"), batch: int = 1,
             seq: int = 4096) -> Estimate:  # fmt: skip
    codes, floats = weight_bytes(config, bits, group_size)
    adapters = lora_params(config, rank, targets) * 16  # fp32 weight + grad + two AdamW moments
    h, layers = config.hidden_size, config.num_hidden_layers
    tokens = batch * seq
    saved = layers * tokens * h * 2  # each layer's input, kept by gradient checkpointing (bf16)
    k = config.moe_k or 1
    widest = max([config.intermediate_size] + [g["intermediate_size"] for g in config.expert_groups or []])
    recompute = tokens * (12 * h + 3 * k * widest) * 2  # one layer's intermediates, recomputed (bf16)
    logits = tokens * config.vocab_size * (4 + 4)  # fp32 logits and their gradient in the loss
    return Estimate(codes, floats, adapters, saved + recompute + logits)


def full_finetune(config: Ernie45Config, gpus: int, batch: int = 1, seq: int = 4096) -> Estimate:
    """Per GPU, a full fine-tune sharded over `gpus` (FSDP full shard / ZeRO-3, bf16 mixed precision): bf16
    weights and gradients, fp32 master weights and two AdamW moments, all split evenly; activations per GPU as
    for LoRA (each rank runs its own micro-batch)."""
    n = sum(p.numel() for p in build_on_meta(config).parameters())
    states = n * (2 + 2 + 4 + 4 + 4) / gpus
    lora = estimate(config, 16, 32, 0, (), batch, seq)
    return Estimate(codes=0.0, floats=states, adapters=0.0, activations=lora.activations)


def main(argv: list[str] | None = None) -> None:
    from .. import presets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=presets.names())
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--targets",
        default="attention,shared_experts",
        help="LoRA targets, comma-separated: attention, shared_experts, experts",
    )
    ap.add_argument("--full", type=int, metavar="GPUS", help="a full fine-tune sharded over GPUS instead of LoRA")
    args = ap.parse_args(argv)
    if args.full:
        e = full_finetune(presets.get(args.preset), args.full, args.batch, args.seq)
        print(f"{args.preset}, full fine-tune sharded over {args.full} GPUs (bf16 weights and grads, fp32 master and "
              f"AdamW), {args.batch} x {args.seq} tokens a GPU, gradient checkpointing, per GPU:")  # fmt: skip
        print(e.table().replace("float parts", "model states"))
        return
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets or set(targets) - set(LORA_TARGETS):
        ap.error(f"--targets: choose from {', '.join(LORA_TARGETS)}")
    e = estimate(presets.get(args.preset), args.bits, args.group_size, args.rank, targets, args.batch, args.seq)
    print(f"{args.preset}, int{args.bits} base, LoRA r={args.rank} on {' + '.join(targets)}, "
          f"{args.batch} x {args.seq} tokens, gradient checkpointing:")  # fmt: skip
    print(e.table())


if __name__ == "__main__":
    main()
