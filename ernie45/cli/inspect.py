"""`ernie45 info` and `ernie45 export`: look at a preset or checkpoint, convert to the official layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import presets
from ..checkpoint import build_on_meta, export
from ..config import MODALITIES, Ernie45Config
from ..model.stats import parameter_counts
from ..official_config import read_config
from .errors import UsageError


def resolve_config(name_or_dir: str) -> tuple[Ernie45Config, str]:
    if name_or_dir in presets.PRESETS:
        return presets.get(name_or_dir), "preset"
    path = Path(name_or_dir)
    if path.is_dir():
        return read_config(path)[0], f"checkpoint {path}"
    raise UsageError(
        f"{name_or_dir!r} is neither a preset nor a checkpoint directory; presets: {', '.join(presets.names())}"
    )


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def describe(config: Ernie45Config) -> str:
    """A readable summary of the structure and the parameter counts (built on the meta device)."""
    model = build_on_meta(config)
    c = config
    moe = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    dense = [i for i in range(c.num_hidden_layers) if i not in moe]
    names = {v: k for k, v in MODALITIES.items()}
    lines = [
        f"layers        {c.num_hidden_layers}: dense {_ranges(dense)}; MoE {_ranges(moe)}",
        f"hidden        {c.hidden_size}, vocab {c.vocab_size}, context {c.max_position_embeddings}",
        f"attention     {c.num_attention_heads} heads x {c.head_dim}, {c.num_key_value_heads} KV heads (GQA), "
        f"interleaved RoPE theta {c.rope_theta:g}",
        f"dense FFN     SwiGLU width {c.intermediate_size}" if dense else "dense FFN     none",
    ]
    for g in c.expert_groups:
        mods = ",".join(names[m] for m in g["modalities"])
        lines.append(
            f"experts       {g['name']}: {g['num_experts']} x width {g['intermediate_size']}, top-{c.moe_k} "
            f"(tokens: {mods})"
        )
    if c.is_moe:
        lines.append(f"shared        {c.moe_num_shared_experts} experts, SwiGLU width {c.moe_shared_intermediate_size}")
    if c.vision_config is not None:
        v = c.vision_config
        lines.append(
            f"vision        ViT {v['depth']} x {v['hidden_size']} ({v['num_heads']} heads), patch {v['patch_size']}, "
            f"merge {v['spatial_merge_size']}x{v['spatial_merge_size']} + {v['temporal_merge_size']} frames -> "
            f"{c.hidden_size}; 3D RoPE ({c.freq_allocation} temporal pairs)"
        )
    if c.audio_config is not None:
        a = c.audio_config
        lines.append(
            f"audio         encoder {a['num_layers']} x {a['hidden_size']} ({a['num_heads']} heads) over {a['n_mels']} "
            f"mel bins, {a['window_seconds']:g} s windows, {100 / (2 * a['merge']):g} tokens/s -> {c.hidden_size}"
        )
    lines.append(f"lm head       {'tied to the embedding' if c.tie_word_embeddings else 'separate'}")
    lines.append(
        "components    "
        + ", ".join(
            f"{n} {_b(sum(p.numel() for p in m.parameters()))}"
            for n, m in model.model.named_children()
            if list(m.parameters())
        )
    )
    total, active = parameter_counts(model)
    lines.append(f"parameters    {_b(total)} total, {_b(active)} active per text token")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    config, what = resolve_config(args.model)
    print(f"{args.model} ({what})")
    print(describe(config))


def cmd_export(args: argparse.Namespace) -> None:
    src = Path(args.src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a checkpoint directory")
    if args.format == "gguf":
        from ..checkpoint.gguf_export import export_gguf

        try:
            out = export_gguf(src, args.out, args.type)
        except ImportError:
            raise UsageError("GGUF export needs the gguf package: pip install gguf") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f"wrote {out} (GGUF, {args.type}) for llama.cpp")
        return
    if args.type != "bf16":
        raise UsageError("--type applies to --format gguf; the official layout keeps the checkpoint's dtype")
    out = export(src, args.out, shard_size_gb=args.shard_size_gb)
    print(f"wrote the official layout to {out}")


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="structure and parameter counts of a preset or checkpoint")
    info.add_argument("model", metavar="PRESET_OR_DIR", help=f"one of {', '.join(presets.names())}, or a directory")
    info.set_defaults(func=cmd_info)
    ex = sub.add_parser("export", help="write a checkpoint in the official -PT layout (transformers, vLLM read it)")
    ex.add_argument("src", metavar="DIR", help="checkpoint directory (any layout ernie45 reads)")
    ex.add_argument("out", metavar="OUT", help="output directory")
    ex.add_argument("--shard-size-gb", type=float, default=5.0, help="largest shard size (default 5)")
    ex.add_argument(
        "--format",
        choices=["official", "gguf"],
        default="official",
        help="official: the -PT safetensors layout; gguf: one file for llama.cpp / ollama (OUT: the file)",
    )
    ex.add_argument(
        "--type",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        default="bf16",
        help="GGUF tensor type for the matrices (default bf16; norms and routers stay f32)",
    )
    ex.set_defaults(func=cmd_export)
    q = sub.add_parser("quantize", help="weight-only int8 / int4 copy of a checkpoint (ernie45 loads it as is)")
    q.add_argument("dir", metavar="DIR", help="checkpoint directory (any layout ernie45 reads)")
    q.add_argument("out", metavar="OUT", help="new output directory")
    q.add_argument("--bits", type=int, choices=[4, 8], required=True, help="8: per-channel int8; 4: group-wise int4")
    q.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4 group size (default 32)")
    q.add_argument("--float-lm-head", action="store_true",
                   help="keep the LM head in float (default: int8 per channel, whatever --bits says)")  # fmt: skip
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    """Load, quantize the weights (int8 per channel / int4 per group), save with the tokenizer beside them. Each
    decoder layer is quantized as soon as it is read, so a 44 GB bf16 checkpoint never exists whole in memory."""
    import shutil
    from functools import partial

    from ..checkpoint import load
    from ..checkpoint.chat_ready import make_chat_ready
    from ..checkpoint.quantized import save_quantized
    from ..runtime import hugepages
    from ..runtime.quant import quantize, quantize_modules

    src, out = Path(args.dir), Path(args.out)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} is not a checkpoint directory (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new directory")
    stored = load(src, device="meta").config.dtype  # the source's float dtype: the float parts keep it
    stored = stored if isinstance(stored, torch.dtype) else torch.bfloat16
    quantize_layer = partial(quantize_modules, bits=args.bits, group_size=args.group_size, progress=False)

    def each(layer: torch.nn.Module) -> None:
        quantize_layer(layer)
        hugepages.trim()  # the layer's float weights back to the OS (glibc would keep them: a 21B model's 44 GB)

    model = load(src, dtype=torch.float32, on_layer=each)
    quantize(model, bits=args.bits, group_size=args.group_size, lm_head=not args.float_lm_head)
    save_quantized(model, out, float_dtype=stored)
    for f in src.iterdir():  # tokenizer, chat template, processor and generation settings travel along
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    make_chat_ready(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    print(f"wrote {out} (int{args.bits}{f', groups of {args.group_size}' if args.bits == 4 else ''}, {size:.1f} MiB)")
