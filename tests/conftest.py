"""Shared fixtures: tiny random reference checkpoints built with transformers in the test itself."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*deprecated.*")

TINY = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)  # fmt: skip  (head_dim 16 != 48 / 4: the 0.3B's rectangular q/o projections)


def make_reference_dense(seed: int = 0, **overrides) -> Ernie4_5ForCausalLM:
    torch.manual_seed(seed)
    return Ernie4_5ForCausalLM(Ernie4_5Config(**{**TINY, **overrides})).eval()


def make_reference_moe(seed: int = 0, **overrides) -> Ernie4_5_MoeForCausalLM:
    """Tiny text MoE: layer 0 dense, layers 1.. MoE, random non-zero correction bias."""
    torch.manual_seed(seed)
    kw = dict(
        TINY, moe_num_experts=8, moe_k=3, moe_intermediate_size=24, moe_num_shared_experts=2, moe_layer_start_index=1
    )
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            # large enough to change which experts win, so "bias selects only" is actually exercised
            layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0, 0.1)
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def ref_dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref_dense")
    make_reference_dense().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ref_moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref_moe")
    make_reference_moe().save_pretrained(path)
    return path


# ---- vision-language ---------------------------------------------------------------------------------
IMG, IMG_START, IMG_END, VID, VID_START, VID_END = 100295, 101304, 101305, 103367, 101306, 101307
VL_TEXT = dict(
    vocab_size=103400,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_num_experts=6,
    moe_k=2,
    moe_intermediate_size=[16, 8],
    moe_num_shared_experts=1,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 4]},
)
VL_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    in_channels=3,
    spatial_merge_size=2,
    temporal_merge_size=2,
)


def make_reference_vl(seed: int = 0):
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(text_config=VL_TEXT, vision_config=VL_VISION))
    with torch.no_grad():
        for layer in model.model.language_model.layers[1:]:
            for group in (layer.mlp.text_moe, layer.mlp.vision_moe):
                group.gate.moe_statics.e_score_correction_bias.normal_(0, 0.1)
                group.gate.weight.normal_(0, 0.5)
        for p in model.model.vision_tower.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)  # large enough that the image content visibly moves the logits
    return model.eval()


def vl_batch(seed: int = 0) -> dict:
    """Two left-padded rows: [text, image, text, 4-frame video, text] and [text, image, text]."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, 1000, (n,), generator=g).tolist()

    rows = [
        text(3) + [IMG_START] + [IMG] * 4 + [IMG_END] + text(2) + [VID_START] + [VID] * 12 + [VID_END] + text(3),
        text(5) + [IMG_START] + [IMG] * 6 + [IMG_END] + text(4),
    ]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    igrid, vgrid = torch.tensor([[1, 4, 4], [1, 6, 4]]), torch.tensor([[4, 4, 6]])
    return dict(
        input_ids=ids,
        attention_mask=mask,
        image_grid_thw=igrid,
        video_grid_thw=vgrid,
        pixel_values=torch.randn(int(igrid.prod(-1).sum()), 588, generator=g),
        pixel_values_videos=torch.randn(int(vgrid.prod(-1).sum()), 588, generator=g),
    )


def reference_vl_kwargs(batch: dict) -> dict:
    """What transformers' processor adds: placeholder types, and types that count the markers as vision."""
    ids = batch["input_ids"]
    mm = torch.zeros_like(ids).masked_fill(ids == IMG, 1).masked_fill(ids == VID, 2)
    moe = mm.masked_fill((ids == IMG_START) | (ids == IMG_END), 1).masked_fill((ids == VID_START) | (ids == VID_END), 2)
    return dict(batch, mm_token_type_ids=mm, moe_mm_token_type_ids=moe)


@pytest.fixture(scope="session")
def ref_vl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref_vl")
    make_reference_vl().save_pretrained(path)
    return path
