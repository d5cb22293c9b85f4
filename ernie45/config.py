"""One configuration for the whole ERNIE 4.5 family.

Dense, text-MoE, VL and omni models differ only in the values here: the trunk reads these fields and
never the model's name. `read_config` turns an official config.json (``ernie4_5``, ``ernie4_5_moe``) or
ernie45's own into an `Ernie45Config`; `to_official` writes the official form back for export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

# Every token carries one of these modality ids (the same numbering as transformers' mm_token_type_ids).
MODALITIES: dict[str, int] = {"text": 0, "image": 1, "video": 2, "audio": 3}


class ConfigError(ValueError):
    """A config.json that ernie45 cannot read; the message says which field and why."""


class Ernie45Config(PreTrainedConfig):
    r"""Configuration of an ERNIE 4.5 model of any variant.

    expert_groups (`list[dict]`, *optional*):
        Routed expert groups of the MoE layers, in checkpoint order. Each is
        ``{"name": str, "num_experts": int, "intermediate_size": int, "modalities": [int, ...]}``; a token is
        routed by the group that lists its modality id (see `MODALITIES`). Empty or None: a dense model.
    moe_k (`int`): experts chosen per token (top-k) within its group.
    moe_num_shared_experts (`int`): shared experts every token goes through (0 for none).
    moe_shared_intermediate_size (`int`, *optional*): width of the shared SwiGLU; defaults to the first
        group's width times ``moe_num_shared_experts``.
    moe_layer_start_index / moe_layer_end_index / moe_layer_interval (`int`): layer ``i`` is MoE iff
        ``(i + 1) % interval == 0 and start <= i <= end`` (end -1 means the last layer).
    moe_norm_min (`float`): floor of the renormalisation of the top-k routing weights.
    """

    model_type = "ernie45"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    use_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True

    expert_groups: list | None = None
    moe_k: int = 6
    moe_num_shared_experts: int = 0
    moe_shared_intermediate_size: int | None = None
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        self.expert_groups = [dict(g) for g in (self.expert_groups or [])]
        for g in self.expert_groups:
            missing = {"name", "num_experts", "intermediate_size", "modalities"} - set(g)
            if missing:
                raise ConfigError(f"expert group {g} lacks {sorted(missing)}")
            if g["num_experts"] < self.moe_k:
                raise ConfigError(
                    f"expert group {g['name']!r} has {g['num_experts']} experts but moe_k={self.moe_k}; "
                    "a group needs at least moe_k experts"
                )
        if self.expert_groups and self.moe_shared_intermediate_size is None:
            width = self.expert_groups[0]["intermediate_size"]
            self.moe_shared_intermediate_size = width * self.moe_num_shared_experts
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        super().__post_init__(**kwargs)

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_groups)

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )


# ---- official config.json <-> Ernie45Config -------------------------------------------------------------

# Fields that keep their name between the official text configs and ours.
_SHARED_FIELDS = (
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
_MOE_FIELDS = ("moe_k", "moe_num_shared_experts", "moe_norm_min", "moe_layer_interval")


def _rope_theta(d: dict) -> float:
    """The hub writes ``rope_theta``; transformers 5 writes ``rope_parameters: {rope_theta: ...}``."""
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        return 500000.0
    if (params.get("rope_type") or "default") != "default" or d.get("rope_scaling"):
        raise ConfigError(f"RoPE scaling {params or d.get('rope_scaling')} is not used by ERNIE 4.5; not supported")
    return float(theta)


def _from_text_official(d: dict) -> Ernie45Config:
    kw: dict[str, Any] = {k: d[k] for k in _SHARED_FIELDS if k in d and d[k] is not None}
    kw["rope_theta"] = _rope_theta(d)
    if d.get("model_type") == "ernie4_5_moe":
        kw.update({k: d[k] for k in _MOE_FIELDS if k in d})
        kw["moe_layer_start_index"] = d.get("moe_layer_start_index", 1)
        kw["moe_layer_end_index"] = d.get("moe_layer_end_index", -1)
        kw["expert_groups"] = [
            {
                "name": "text",
                "num_experts": d.get("moe_num_experts", 64),
                "intermediate_size": d.get("moe_intermediate_size", 1536),
                "modalities": list(MODALITIES.values()),
            }
        ]
    if "torch_dtype" in d or "dtype" in d:
        kw["dtype"] = d.get("dtype") or d.get("torch_dtype")
    return Ernie45Config(**kw)


_READERS = {
    "ernie45": lambda d: Ernie45Config(**{k: v for k, v in d.items() if k != "model_type"}),
    "ernie4_5": _from_text_official,
    "ernie4_5_moe": _from_text_official,
}


def config_from_dict(d: dict) -> Ernie45Config:
    """Build an `Ernie45Config` from any supported config.json content."""
    model_type = d.get("model_type")
    if model_type not in _READERS:
        known = ", ".join(sorted(_READERS))
        raise ConfigError(f"config.json has model_type {model_type!r}; ernie45 reads {known}")
    return _READERS[model_type](d)


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
    if len(config.expert_groups) == 1:
        return "ernie4_5_moe"
    raise ConfigError("export of multi-group (VL / omni) models to the official layout is not available yet")


def to_official(config: Ernie45Config) -> dict:
    """The official config.json for `config` (the layout `ernie45 export` writes)."""
    model_type = official_model_type(config)
    d: dict[str, Any] = {k: getattr(config, k) for k in _SHARED_FIELDS}
    d["rope_theta"] = config.rope_theta
    d["model_type"] = model_type
    d["architectures"] = ["Ernie4_5ForCausalLM" if model_type == "ernie4_5" else "Ernie4_5_MoeForCausalLM"]
    if config.is_moe:
        (group,) = config.expert_groups
        d.update({k: getattr(config, k) for k in _MOE_FIELDS})
        d.update(
            moe_num_experts=group["num_experts"],
            moe_intermediate_size=group["intermediate_size"],
            moe_layer_start_index=config.moe_layer_start_index,
            moe_layer_end_index=config.moe_layer_end_index,
        )
        if config.moe_shared_intermediate_size != group["intermediate_size"] * config.moe_num_shared_experts:
            raise ConfigError("the official layout needs shared width = expert width x moe_num_shared_experts")
    if config.dtype is not None:
        d["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    return d
