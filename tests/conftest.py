"""Shared fixtures: tiny random reference checkpoints built with transformers in the test itself."""

from __future__ import annotations

import warnings

import pytest
import torch
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
