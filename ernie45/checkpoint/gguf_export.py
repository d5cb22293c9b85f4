"""`ernie45 export DIR OUT.gguf --format gguf --type bf16|f16|f32|q8_0|q4_0`: a dense or text-MoE model for
llama.cpp / ollama users.

The tensors are the official layout's (`export.official_tensors`), renamed by gguf-py's own name table for the
`ernie4_5` / `ernie4_5-moe` architectures and with each MoE layer's experts stacked into one 3D tensor per
projection, as llama.cpp's converter stacks them; the metadata are the keys that converter writes for these
architectures (context and widths, heads, RoPE base, RMSNorm epsilon; expert count, experts used, the first MoE
layer and the interval, expert and shared-expert widths), and the vocabulary is the SentencePiece model's
(tokens, scores, types), the added special tokens and the chat template. Norms, routers and the correction
bias stay f32; matrices take the chosen type (a matrix whose rows the block size does not divide stays f16).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..official_config import official_model_type, to_official

log = logging.getLogger("ernie45")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def export_gguf(model_or_dir, out: str | Path, type: str = "bf16", tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model_or_dir` (a dense or text-MoE checkpoint, any layout ernie45 reads) as one GGUF file."""
    import gguf

    from .export import official_tensors
    from .load import load

    if type not in TYPES:
        raise ValueError(f"GGUF type {type!r}: choose one of {', '.join(TYPES)}")
    source = Path(model_or_dir) if isinstance(model_or_dir, (str, Path)) else None
    model = load(source) if source is not None else model_or_dir
    from ..runtime.quant import dequantize, is_quantized

    if is_quantized(model):
        if source is None:
            raise ValueError("GGUF export of a quantized model: pass its checkpoint directory")
        dequantize(model, torch.float32)
    config = model.config
    kind = official_model_type(config)
    if kind not in ("ernie4_5", "ernie4_5_moe"):
        raise ValueError("GGUF export: llama.cpp has the ERNIE 4.5 dense and text-MoE architectures; this is a "
                         f"{kind} model (vision and audio have no llama.cpp form)")  # fmt: skip
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else source
    if tok_dir is None or not (tok_dir / "tokenizer.model").is_file():
        raise ValueError("GGUF export needs the SentencePiece tokenizer.model of the official checkpoints (llama.cpp "
                         "reads ERNIE 4.5's vocabulary as SentencePiece): pass the checkpoint directory")  # fmt: skip
    arch = gguf.MODEL_ARCH.ERNIE4_5 if kind == "ernie4_5" else gguf.MODEL_ARCH.ERNIE4_5_MOE
    official = to_official(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, official, config, type)
    _vocabulary(writer, tok_dir, official["vocab_size"])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in official_tensors(model):
        parts = name.split(".")
        if ".mlp.experts." in name and parts[5].isdigit():  # model.layers.L.mlp.experts.E.{proj}.weight
            layer, expert, proj = int(parts[2]), int(parts[5]), parts[6]
            per = experts.setdefault(layer, {}).setdefault(proj, {})
            per[expert] = tensor
            count = official["moe_num_experts"]
            if all(len(experts[layer].get(p, {})) == count for p in ("gate_proj", "up_proj", "down_proj")):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    stacked = torch.stack([experts[layer][p][e] for e in range(count)])
                    _add(writer, names, f"model.layers.{layer}.mlp.experts.{p}.weight", stacked, type)
                del experts[layer]
            continue
        _add(writer, names, name, tensor, type)
    if experts:
        raise ValueError(f"GGUF export: layers {sorted(experts)} have incomplete experts")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return out


def _metadata(w, official: dict, config, type: str) -> None:
    import gguf

    w.add_name(Path(str(getattr(config, "name_or_path", "") or "ernie45")).name or "ernie45")
    w.add_context_length(official["max_position_embeddings"])
    w.add_embedding_length(official["hidden_size"])
    w.add_block_count(official["num_hidden_layers"])
    w.add_feed_forward_length(official["intermediate_size"])
    w.add_head_count(official["num_attention_heads"])
    w.add_head_count_kv(official["num_key_value_heads"])
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(official["rope_theta"])
    w.add_layer_norm_rms_eps(official["rms_norm_eps"])
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]  # fmt: skip
    w.add_file_type(ftype)
    if "moe_num_experts" in official:
        w.add_expert_count(official["moe_num_experts"])
        w.add_expert_used_count(official["moe_k"])
        w.add_interleave_moe_layer_step(official["moe_layer_interval"])
        w.add_leading_dense_block_count(official["moe_layer_start_index"])
        w.add_expert_feed_forward_length(official["moe_intermediate_size"])
        shared = official.get("moe_num_shared_experts") or 0
        w.add_expert_shared_count(shared)
        if shared:
            w.add_expert_shared_feed_forward_length(config.moe_shared_intermediate_size)


def _add(w, names, name: str, tensor: torch.Tensor, type: str) -> None:
    import gguf

    name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # gguf-py's key for exp_probs_b
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"GGUF export: no llama.cpp name for {name}")
    data = tensor.detach().float().cpu().numpy()
    if new.endswith("exp_probs_b.bias"):
        data = data.reshape(-1)  # the official [1, experts] row: llama.cpp reads one bias per expert
    small = data.ndim == 1 or "ffn_gate_inp" in new  # norms, routers: f32, as llama.cpp keeps them
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[type]  # fmt: skip
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if small:
        qtype = gguf.GGMLQuantizationType.F32
    elif data.shape[-1] % block:
        log.warning("GGUF export: %s rows (%d) are not a multiple of %d: kept in f16", new, data.shape[-1], block)
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(new, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(new, data.astype(np.float16))
    else:
        w.add_tensor(new, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def _vocabulary(w, tok_dir: Path, vocab_size: int) -> None:
    """SentencePiece pieces with their scores and types, the added tokens, padding to the embedding's rows, the
    special ids and the chat template."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    kinds = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i) else
                     kinds.UNUSED if sp.is_unused(i) else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL)  # fmt: skip
    file = tok_dir / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    added = {int(k): v for k, v in config.get("added_tokens_decoder", {}).items()}
    listed = tok_dir / "added_tokens.json"  # the official checkpoints' form: {content: id}
    specials = set(config.get("additional_special_tokens") or [])
    for content, i in (json.loads(listed.read_text()) if listed.is_file() else {}).items():
        added.setdefault(int(i), {"content": content, "special": content in specials})
    for i, spec in sorted(added.items()):
        content = spec["content"] if isinstance(spec, dict) else str(spec)
        kind = kinds.CONTROL if not isinstance(spec, dict) or spec.get("special", True) else kinds.USER_DEFINED
        if i < len(tokens):
            tokens[i], types[i] = content.encode(), kind
            continue
        _pad(tokens, scores, types, i)
        tokens.append(content.encode())
        scores.append(-1000.0)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    _pad(tokens, scores, types, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=vocab_size).add_to_gguf(w)


def _pad(tokens: list, scores: list, types: list, upto: int) -> None:
    """Unused placeholder pieces up to id `upto` (the embedding has rows no piece names), as llama.cpp pads."""
    import gguf

    while len(tokens) < upto:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
