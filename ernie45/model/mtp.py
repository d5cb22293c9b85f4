"""Multi-token prediction (MTP): one more decoder layer that guesses the token after next.

The official 21B-A3B ships it (`mtp_emb_norm`, `mtp_hidden_norm`, `mtp_linear_proj`, `mtp_block`, one of each per
depth; docs/architecture.md). For the token at position p it reads the trunk's last hidden state at p - 1 (before
the final norm) and the embedding of the token at p, and predicts the token at p + 1:

    h' = block(linear_proj(cat[emb_norm(embed(t_p)), hidden_norm(h_{p-1})]))     logits = lm_head(norm(h'))

at RoPE position p, attending over the earlier MTP positions. This follows the original training code
(PaddleFormers' ERNIE model: the hidden state before the final norm goes in, the output goes through the final
norm); vLLM's `ernie_mtp` feeds the normed hidden state and applies no final norm (no checkpoint here decides
between them). The block is a decoder layer of the trunk's kind
at index num_hidden_layers + depth (dense in every released config). It never changes the next-token logits:
the engine uses it to draft a token that the trunk then verifies (`engine.speculative`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import Ernie45Config
from .layers import RMSNorm, rope_cos_sin


def mtp_modules(config: Ernie45Config, decoder_layer: type[nn.Module]) -> dict[str, nn.ModuleList]:
    """The MTP modules under the checkpoint's names (`model.mtp_block.0.…`), one of each per depth."""
    n, h = config.num_nextn_predict_layers, config.hidden_size
    return {
        "mtp_emb_norm": nn.ModuleList(RMSNorm(h, config.rms_norm_eps) for _ in range(n)),
        "mtp_hidden_norm": nn.ModuleList(RMSNorm(h, config.rms_norm_eps) for _ in range(n)),
        "mtp_linear_proj": nn.ModuleList(nn.Linear(2 * h, h, bias=False) for _ in range(n)),
        "mtp_block": nn.ModuleList(decoder_layer(config, config.num_hidden_layers + d) for d in range(n)),
    }


def mtp_forward(trunk, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor, mask,
                cache=None, depth: int = 0) -> torch.Tensor:  # fmt: skip
    """[B, S, H] trunk hidden states (before the final norm) and the embeddings of the tokens one later, at those
    tokens' positions -> the MTP block's output [B, S, H] (before the final norm). `trunk` is the `Ernie45Model`
    holding the MTP modules."""
    c = trunk.config
    rope = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.freq_allocation)
    x = torch.cat([trunk.mtp_emb_norm[depth](next_embeds), trunk.mtp_hidden_norm[depth](prev_hidden)], dim=-1)
    return trunk.mtp_block[depth](trunk.mtp_linear_proj[depth](x), rope, mask, cache)


def with_mtp(model: nn.Module, depths: int = 1) -> nn.Module:
    """A copy of `model` with `depths` freshly initialised MTP layers (to train one for a model that has none);
    the other weights are `model`'s."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_nextn_predict_layers = depths
    new = type(model)(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    wrong = [k for k in missing if ".mtp_" not in k] + list(unexpected)
    if wrong:  # e.g. a runtime-prepared (fused) model: its weights are no longer the plain modules'
        raise ValueError(f"with_mtp: the model's weights do not match a plain model's ({wrong[:3]}...)")
    old = dict(model.named_parameters())
    for name, p in new.named_parameters():  # every weight in `model`'s dtype; each MTP weight in its twin's
        twin = re.sub(r"model\.mtp_block\.\d+\.", "model.layers.0.", name)
        norm = "norm" in name
        ref = old.get(name, old[twin if twin in old else "model.norm.weight" if norm else "model.embed_tokens.weight"])
        p.data = p.data.to(ref.dtype)
    return new.to(next(model.parameters()).device)
