"""`ernie45.export`: write a model in the official layout (per-expert keys + official config.json).

The same rule tables that load a checkpoint are read backwards here, so what we write is exactly what
we read, and what transformers, vLLM and llama.cpp's converter read.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..official_config import official_model_type, to_official
from ..runtime.quant import dequantize, is_quantized
from .chat_ready import make_chat_ready
from .rules import RULES_BY_MODEL_TYPE, Rule

log = logging.getLogger("ernie45")

# Files that travel with the weights (tokenizer, generation defaults, media preprocessing).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
)


def official_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(official key, tensor) for every weight of `model`; expert slices are views, not copies."""
    config = model.config
    rules = [r for r in RULES_BY_MODEL_TYPE[official_model_type(config)] if r.export]
    groups = config.expert_groups or []
    names = [g["name"] for g in groups]
    offsets = {g["name"]: sum(h["num_experts"] for h in groups[:i]) for i, g in enumerate(groups)}
    rows: dict[str, list] = {}
    for name, param in model.named_parameters():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = param.detach()
        matched = [(r, f) for r in rules if (f := r.match_ours(name)) is not None]
        specific = [(r, f) for r, f in matched if r.theirs != "{rest}"] or matched[:1]
        for rule, fields in specific:
            yield from _emit(rule, fields, t, names, offsets, rows, len(groups))
    yield from getattr(model, "mtp_state_dict", {}).items()  # kept aside on load, written back unchanged


def _emit(rule: Rule, fields: dict, t: torch.Tensor, names, offsets, rows, n_groups):
    if rule.part == "whole":
        yield rule.theirs.format(**fields), (t.T.contiguous() if rule.transpose else t)
    elif rule.part == "row":
        key = rule.theirs.format(**fields)
        rows.setdefault(key, [None] * n_groups)[names.index(fields["group"])] = t
        if all(r is not None for r in rows[key]):
            yield key, torch.stack(rows.pop(key))
    else:
        width = t.shape[-1] if rule.part == "expert" else t.shape[1] // 2
        for e in range(t.shape[0]):
            region = {"gate": t[e, :width], "up": t[e, width:], "expert": t[e]}[rule.part]
            yield rule.theirs.format(**fields, expert=offsets[fields["group"]] + e), region


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> list[str]:
    """Write (key, tensor) pairs as model.safetensors, or as shards plus an index when larger than shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in tqdm(list(zip(names, shards, strict=True)), desc="writing shards", disable=None):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def export(model_or_dir, out: str | Path, shard_size_gb: float = 5.0):
    """Write `model_or_dir` (a model or a checkpoint directory of any layout) to `out` in the official layout."""
    from .load import load

    source = None
    if isinstance(model_or_dir, (str, Path)):
        source = Path(model_or_dir)
        model = load(source)
    else:
        model = model_or_dir
    if is_quantized(model):  # the official layout has no int8 / int4 form: the values the model computes with
        if source is None:  # do not change the caller's model in place
            raise ValueError(
                "export of a quantized model: pass its checkpoint directory, or call "
                "ernie45.runtime.quant.dequantize(model) first (the official layout holds float weights)"
            )
        log.warning("ernie45 export: %s is quantized; writing its dequantised weights in bf16", source)
        dequantize(model, torch.bfloat16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    official = to_official(model.config)
    write_safetensors(official_tensors(model), out, int(shard_size_gb * 2**30))
    (out / "config.json").write_text(json.dumps(official, indent=2) + "\n")
    if source is not None:
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
    _plain_tokenizer_class(out)
    make_chat_ready(out)
    return out


def _plain_tokenizer_class(out: Path) -> None:
    """ernie45's tokenizer class is its own (it refuses media); readers of the official layout get the plain one."""
    file = out / "tokenizer_config.json"
    if file.is_file():
        config = json.loads(file.read_text())
        if config.get("tokenizer_class") == "Ernie45Tokenizer":
            config["tokenizer_class"] = "TokenizersBackend"
            file.write_text(json.dumps(config, indent=2) + "\n")
