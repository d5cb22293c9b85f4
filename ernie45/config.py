"""One configuration for the whole ERNIE 4.5 family.

Dense, text-MoE, VL and omni models differ only in the values here: the trunk reads these fields and
never the model's name. Official config.json forms are read and written by `ernie45.official_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import PreTrainedConfig

# Every token carries one of these modality ids (the same numbering as transformers' mm_token_type_ids).
MODALITIES: dict[str, int] = {"text": 0, "image": 1, "video": 2, "audio": 3}


class ConfigError(ValueError):
    """A config.json that ernie45 cannot read; the message says which field and why."""


def _checked(cls, d: dict, what: str):
    """cls(**d), with unknown fields named instead of a TypeError."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{what} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder's fields, read from ``Ernie45Config.vision_config`` (a plain dict in config.json)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    patch_size: int = 14
    in_channels: int = 3
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return _checked(cls, d, "vision_config")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class AudioConfig:
    """The audio encoder's fields (``Ernie45Config.audio_config``): Whisper-style front end and encoder.

    16 kHz mono -> log-mel (n_fft 400 = 25 ms Hann window, hop 160 = 10 ms: 100 frames/s) -> two conv1d
    (the second with stride 2: 50 frames/s) -> a bidirectional transformer attending within windows of
    `window_seconds` -> the resampler merges `merge` frames (12.5 tokens/s) and projects to the trunk width.
    """

    n_mels: int = 128
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    window_seconds: float = 30.0
    merge: int = 4
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    max_seconds: float = 600.0
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> AudioConfig:
        return _checked(cls, d, "audio_config")

    @property
    def mel_frames_per_token(self) -> int:
        return 2 * self.merge  # conv stride 2, then `merge` encoder frames per token


_SIZE_LIMITS = {  # field: the largest value any real or planned ERNIE 4.5 model is far below
    "vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 1 << 24, "moe_k": 1024,
}  # fmt: skip


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
    vision_config (`dict`, *optional*): the ViT and resampler (see `VisionConfig`).
    audio_config (`dict`, *optional*): the audio encoder and resampler (see `AudioConfig`).
    freq_allocation (`int`): RoPE pairs given to the temporal axis of 3D positions (0: 1D RoPE only).
    """

    model_type = "ernie45"
    keys_to_ignore_at_inference = ["cache"]
    # transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): attention heads and
    # the dense / shared-expert FFN split across ranks, their outputs summed; routed experts stay whole per rank
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_experts.gate_proj": "colwise", "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }  # fmt: skip

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """transformers' expert parallelism (`DistributedConfig(ep_size=N)` under torchrun): each routed group's
        stacked experts split over the ranks, the group's call (the block has routed already) taken over by the
        token dispatch; routers, attention and shared experts stay whole."""
        plan = {}
        for g in self.expert_groups or []:
            at = f"layers.*.mlp.groups.{g['name']}"
            plan |= {f"{at}.gate_up_proj": "grouped_gemm", f"{at}.down_proj": "grouped_gemm", at: "ep_dispatch_experts"}
        return plan

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

    vision_config: dict | None = None
    audio_config: dict | None = None
    freq_allocation: int = 0
    num_nextn_predict_layers: int = 0

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

    def _check_sizes(self) -> None:
        """Sizes are whole numbers in range, and the float settings positive numbers: a config that would build a
        broken or absurd model is refused with the field's name instead of failing somewhere inside."""
        for name, limit in _SIZE_LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
                raise ConfigError(f"{name} must be a whole number from 1 to {limit:,}; the config has {v!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
                                          or not 2 <= self.head_dim <= 4096):  # fmt: skip
            raise ConfigError(f"head_dim must be a whole number from 2 to 4096; the config has {self.head_dim!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{name} must be a positive number; the config has {v!r}")
        for name in ("moe_num_shared_experts", "moe_layer_interval", "freq_allocation", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "moe_layer_interval" else 0):
                raise ConfigError(f"{name} must be a whole number >= {int(name == 'moe_layer_interval')}; the config "
                                  f"has {v!r}")  # fmt: skip
        for g in self.expert_groups or []:
            for key in ("num_experts", "intermediate_size"):
                v = g.get(key) if isinstance(g, dict) else None
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 20:
                    raise ConfigError(f"expert group {g!r}: {key} must be a whole number >= 1")

    def __post_init__(self, **kwargs: Any) -> None:
        self._check_sizes()
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
        if self.vision_config is not None:  # complete them, so config.json states every encoder field
            self.vision_config = asdict(VisionConfig.from_dict(self.vision_config))
        if self.audio_config is not None:
            self.audio_config = asdict(AudioConfig.from_dict(self.audio_config))
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be an even number >= 2 (RoPE turns pairs)")
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
