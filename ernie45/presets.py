"""Named configurations of the family. Variants are data: each preset is a dict of config fields.

``ernie-4.5-8b-omni`` is this project's own design (no released checkpoint): the VL-28B recipe shrunk to
about 8B parameters, plus hearing. Its dimensions and why:

- hidden 2048, 16 query heads x 128 (head_dim 128 as every released ERNIE 4.5), 4 KV heads: the
  attention of a 2-3B dense model, cheap KV cache at 131,072 tokens (24 x 2 x 4 x 128 x 2 B = 48 KiB/token).
- 24 layers, layer 0 dense (width 8192), layers 1-23 MoE, as the released MoEs keep their first layer dense.
- 64 text experts of width 448 and 64 vision experts of width 224 (the VL model's 3:1 ratio, halved in
  width), top-8, 2 shared experts (width 896) that every token passes through.
- audio: its own group of 32 experts of width 192 (mapping modality 3 into the vision group instead is a
  config choice), a Whisper-small-sized encoder (12 x 768, 87M) and a resampler to 12.5 tokens/s.
- the VL model's ViT (0.63B) and resampler (0.14B) unchanged, so VL-28B vision weights can seed it.
- about 8.46B in total, about 1.15B active per text token.
"""

from __future__ import annotations

from .config import MODALITIES, Ernie45Config

ALL = list(MODALITIES.values())
TEXT, VISION, AUDIO = [0], [1, 2], [3]
_VIT = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=5120,
    num_heads=16,
    patch_size=14,
    in_channels=3,
    spatial_merge_size=2,
    temporal_merge_size=2,
    layer_norm_eps=1e-6,
    rope_theta=10000.0,
)
_AUDIO = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, n_mels=128, merge=4)
_ERNIE_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VL_TOKENS = dict(
    image_token_id=100295,
    audio_token_id=100296,
    video_token_id=103367,
    image_start_token_id=101304,
    image_end_token_id=101305,
    video_start_token_id=101306,
    video_end_token_id=101307,
)

PRESETS: dict[str, dict] = {
    "ernie-4.5-0.3b": dict(
        vocab_size=103424,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        **_ERNIE_TOKENS,
    ),
    "ernie-4.5-21b-a3b": dict(
        vocab_size=103424,
        hidden_size=2560,
        intermediate_size=12288,
        num_hidden_layers=28,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=128,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        moe_k=6,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=27,
        expert_groups=[dict(name="text", num_experts=64, intermediate_size=1536, modalities=ALL)],
        **_ERNIE_TOKENS,
    ),
    "ernie-4.5-8b-omni": dict(
        vocab_size=103424,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        moe_k=8,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=23,
        moe_shared_intermediate_size=896,
        expert_groups=[
            dict(name="text", num_experts=64, intermediate_size=448, modalities=TEXT),
            dict(name="vision", num_experts=64, intermediate_size=224, modalities=VISION),
            dict(name="audio", num_experts=32, intermediate_size=192, modalities=AUDIO),
        ],
        **_ERNIE_TOKENS,
        **_VL_TOKENS,
        audio_start_token_id=101308,
        audio_end_token_id=101309,
        vision_config=_VIT,
        audio_config=_AUDIO,
        freq_allocation=20,
    ),
    # The embedded default (``ernie45 chat`` with no --model): the omni layout scaled to ~14M parameters,
    # trained by recipes/demo-omni.yaml on synthetic data; its tokenizer puts the specials at ids 3-15.
    "demo-omni": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_end_index=5,
        moe_shared_intermediate_size=256,
        expert_groups=[
            dict(name="text", num_experts=4, intermediate_size=256, modalities=TEXT),
            dict(name="vision", num_experts=4, intermediate_size=128, modalities=VISION),
            dict(name="audio", num_experts=4, intermediate_size=128, modalities=AUDIO),
        ],
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=512, num_heads=2),
        audio_config=dict(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=2, n_mels=64),
        freq_allocation=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        image_token_id=5,
        image_start_token_id=6,
        image_end_token_id=7,
        video_token_id=8,
        video_start_token_id=9,
        video_end_token_id=10,
        audio_token_id=11,
        audio_start_token_id=12,
        audio_end_token_id=13,
    ),
}


# The VL model is the 21B-A3B text trunk plus the vision path and its own expert group.
PRESETS["ernie-4.5-vl-28b-a3b"] = dict(
    PRESETS["ernie-4.5-21b-a3b"],
    expert_groups=[
        dict(name="text", num_experts=64, intermediate_size=1536, modalities=TEXT),
        dict(name="vision", num_experts=64, intermediate_size=512, modalities=VISION),
    ],
    vision_config=_VIT,
    freq_allocation=20,
    **_VL_TOKENS,
)


def names() -> list[str]:
    return list(PRESETS)


def get(name: str, **overrides) -> Ernie45Config:
    """The config of preset `name`, with any field overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Ernie45Config(**{**PRESETS[name], **overrides})
