"""Official config.json forms <-> `Ernie45Config`.

Reads ``ernie4_5`` (dense), ``ernie4_5_moe`` (text MoE), the original flat VL form ``ernie4_5_moe_vl``
and transformers-5's ``ernie4_5_vl_moe`` (text/vision sub-configs), plus ernie45's own; writes the
official form of a config back for export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import MODALITIES, ConfigError, Ernie45Config

SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "use_bias",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)
MOE_FIELDS = ("moe_k", "moe_num_shared_experts", "moe_norm_min")
VL_TOKEN_FIELDS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)
VL_TOKENS = dict(
    image_token_id=100295,
    image_start_token_id=101304,
    image_end_token_id=101305,
    video_token_id=103367,
    video_start_token_id=101306,
    video_end_token_id=101307,
)
TEXT, VISION = [0], [1, 2]


def _rope(d: dict) -> tuple[float, list | None]:
    """(theta, mrope_section): the hub writes ``rope_theta``, transformers 5 ``rope_parameters``."""
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 500000.0))
    if (params.get("rope_type") or "default") != "default" or d.get("rope_scaling"):
        raise ConfigError(f"RoPE scaling {params or d.get('rope_scaling')} is not used by ERNIE 4.5; not supported")
    return float(theta), params.get("mrope_section")


def _common(d: dict) -> dict[str, Any]:
    kw: dict[str, Any] = {k: d[k] for k in SHARED_FIELDS if d.get(k) is not None}
    kw["rope_theta"] = _rope(d)[0]
    if d.get("torch_dtype") or d.get("dtype"):
        kw["dtype"] = d.get("dtype") or d.get("torch_dtype")
    return kw


def _layer_range(starts, ends, layers: int) -> tuple[int, int]:
    starts = starts if isinstance(starts, list) else [starts]
    ends = [layers - 1 if e == -1 else min(e, layers - 1) for e in (ends if isinstance(ends, list) else [ends])]
    if len(set(starts)) != 1 or len(set(ends)) != 1:
        raise ConfigError(f"per-modality MoE layer ranges {starts}..{ends} differ; ernie45 needs one range")
    return starts[0], ends[0]


def _from_text(d: dict) -> Ernie45Config:
    kw = _common(d)
    if d.get("model_type") == "ernie4_5_moe":
        kw.update({k: d[k] for k in MOE_FIELDS if k in d})
        kw["moe_layer_interval"] = d.get("moe_layer_interval", 1)
        layers = d.get("num_hidden_layers", 28)
        start, end = _layer_range(d.get("moe_layer_start_index", 1), d.get("moe_layer_end_index", -1), layers)
        kw.update(moe_layer_start_index=start, moe_layer_end_index=end)
        kw["expert_groups"] = [
            dict(
                name="text",
                num_experts=d.get("moe_num_experts", 64),
                intermediate_size=d.get("moe_intermediate_size", 1536),
                modalities=list(MODALITIES.values()),
            )
        ]
    return Ernie45Config(**kw)


def _vl_groups(experts, widths) -> list[dict]:
    experts = experts if isinstance(experts, list) else [experts, experts]
    return [
        dict(name="text", num_experts=experts[0], intermediate_size=widths[0], modalities=TEXT),
        dict(name="vision", num_experts=experts[1], intermediate_size=widths[1], modalities=VISION),
    ]


def _from_vl_transformers(d: dict) -> Ernie45Config:
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    kw = _common({**t, "tie_word_embeddings": d.get("tie_word_embeddings", True), "dtype": d.get("dtype")})
    _, section = _rope(t)
    section = section or [22, 22, 20]
    if section[0] != section[1]:
        raise ConfigError(f"mrope_section {section}: ERNIE's 3D RoPE needs equal h and w sections")
    types = t.get("mlp_layer_types") or ["dense"] + ["sparse"] * (t.get("num_hidden_layers", 28) - 1)
    sparse = [i for i, x in enumerate(types) if x == "sparse"]
    if sparse != list(range(sparse[0], sparse[-1] + 1)):
        raise ConfigError(f"mlp_layer_types {types}: ernie45 needs the sparse layers to be one contiguous range")
    kw.update({k: t[k] for k in MOE_FIELDS if k in t})
    kw.update(moe_layer_start_index=sparse[0], moe_layer_end_index=sparse[-1], freq_allocation=section[2])
    kw["expert_groups"] = _vl_groups(t.get("moe_num_experts", 64), t.get("moe_intermediate_size", [1536, 512]))
    kw["vision_config"] = dict(
        depth=v.get("depth", 32),
        hidden_size=v.get("hidden_size", 1280),
        intermediate_size=v.get("intermediate_size", 5120),
        num_heads=v.get("num_heads", 16),
        patch_size=v.get("patch_size", 14),
        in_channels=v.get("in_channels", 3),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        temporal_merge_size=v.get("temporal_merge_size", 2),
        layer_norm_eps=v.get("rms_norm_eps", 1e-6),
        rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 1e4),
    )
    kw.update({k: d.get(k, VL_TOKENS[k]) for k in VL_TOKEN_FIELDS})
    return Ernie45Config(**kw)


def _from_vl_original(d: dict) -> Ernie45Config:
    kw = _common(d)
    v = d.get("vision_config") or {}
    layers = d.get("num_hidden_layers", 28)
    start, end = _layer_range(d.get("moe_layer_start_index", 1), d.get("moe_layer_end_index", -1), layers)
    kw.update({k: d[k] for k in MOE_FIELDS if k in d})
    kw.update(moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=d.get("moe_layer_interval", 1))
    kw["expert_groups"] = _vl_groups(d.get("moe_num_experts", [64, 64]), d.get("moe_intermediate_size", [1536, 512]))
    kw["freq_allocation"] = d.get("freq_allocation", 20)
    width = v.get("embed_dim", v.get("hidden_size", 1280))
    kw["vision_config"] = dict(
        depth=v.get("depth", 32),
        hidden_size=width,
        intermediate_size=int(width * v.get("mlp_ratio", 4)),
        num_heads=v.get("num_heads", 16),
        patch_size=v.get("patch_size", 14),
        in_channels=v.get("in_channels", 3),
        spatial_merge_size=d.get("spatial_conv_size", 2),
        temporal_merge_size=d.get("temporal_conv_size", 2),
    )
    kw.update(VL_TOKENS)
    kw["image_token_id"] = d.get("im_patch_id", VL_TOKENS["image_token_id"])
    return Ernie45Config(**kw)


READERS = {
    "ernie45": lambda d: Ernie45Config(**{k: v for k, v in d.items() if k != "model_type"}),
    "ernie4_5": _from_text,
    "ernie4_5_moe": _from_text,
    "ernie4_5_vl_moe": _from_vl_transformers,
    "ernie4_5_moe_vl": _from_vl_original,
}


def config_from_dict(d: dict) -> Ernie45Config:
    """Build an `Ernie45Config` from any supported config.json content."""
    model_type = d.get("model_type")
    if model_type not in READERS:
        raise ConfigError(f"config.json has model_type {model_type!r}; ernie45 reads {', '.join(sorted(READERS))}")
    return READERS[model_type](d)


def read_config(path: str | Path) -> tuple[Ernie45Config, str]:
    """Read ``path/config.json`` (or a config.json path); returns the config and the file's model_type."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} does not exist: a checkpoint directory needs a config.json")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    return config_from_dict(d), d.get("model_type", "")


def official_model_type(config: Ernie45Config) -> str:
    """The official model_type whose layout holds this config's structure."""
    if not config.is_moe:
        return "ernie4_5"
    if config.vision_config is None and len(config.expert_groups) == 1:
        return "ernie4_5_moe"
    if config.vision_config is not None and [g["name"] for g in config.expert_groups] == ["text", "vision"]:
        return "ernie4_5_vl_moe"
    raise ConfigError("only dense, text-MoE and text+vision MoE models have an official layout")


def _dtype(config: Ernie45Config) -> str | None:
    return None if config.dtype is None else str(config.dtype).removeprefix("torch.")


def to_official(config: Ernie45Config) -> dict:
    """The official config.json for `config` (the form `ernie45 export` writes)."""
    model_type = official_model_type(config)
    text: dict[str, Any] = {k: getattr(config, k) for k in SHARED_FIELDS}
    groups = config.expert_groups
    if config.is_moe:
        text.update({k: getattr(config, k) for k in MOE_FIELDS})
        if config.moe_shared_intermediate_size != groups[0]["intermediate_size"] * config.moe_num_shared_experts:
            raise ConfigError("the official layout needs shared width = expert width x moe_num_shared_experts")
    if model_type == "ernie4_5_vl_moe":
        return _to_vl(config, text)
    text.update(rope_theta=config.rope_theta, model_type=model_type, torch_dtype=_dtype(config))
    text["architectures"] = ["Ernie4_5ForCausalLM" if model_type == "ernie4_5" else "Ernie4_5_MoeForCausalLM"]
    if config.is_moe:
        text.update(
            moe_num_experts=groups[0]["num_experts"],
            moe_intermediate_size=groups[0]["intermediate_size"],
            moe_layer_start_index=config.moe_layer_start_index,
            moe_layer_end_index=config.moe_layer_end_index,
            moe_layer_interval=config.moe_layer_interval,
        )
    return text


def _to_vl(config: Ernie45Config, text: dict) -> dict:
    c, v = config, config.vision_config
    if len({g["num_experts"] for g in c.expert_groups}) != 1:
        raise ConfigError("the official VL layout needs as many vision experts as text experts")
    text.update(
        model_type="ernie4_5_vl_moe_text",
        moe_num_experts=c.expert_groups[0]["num_experts"],
        moe_intermediate_size=[g["intermediate_size"] for g in c.expert_groups],
        mlp_layer_types=["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.num_hidden_layers)],
        rope_parameters=dict(
            rope_type="default",
            rope_theta=c.rope_theta,
            mrope_section=[(c.head_dim // 2 - c.freq_allocation) // 2] * 2 + [c.freq_allocation],
        ),
    )
    vision = dict(
        model_type="ernie4_5_vl_moe_vision",
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        patch_size=v["patch_size"],
        in_channels=v["in_channels"],
        spatial_merge_size=v["spatial_merge_size"],
        temporal_merge_size=v["temporal_merge_size"],
        rms_norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act="quick_gelu",
        rope_parameters=dict(rope_type="axial", rope_theta=v.get("rope_theta", 1e4)),
    )
    out = dict(
        architectures=["Ernie4_5_VLMoeForConditionalGeneration"],
        model_type="ernie4_5_vl_moe",
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=c.tie_word_embeddings,
        dtype=_dtype(c),
    )
    out.update({k: getattr(c, k) for k in VL_TOKEN_FIELDS})
    return out
