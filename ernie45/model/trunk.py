"""The one trunk of the family: embeddings, decoder layers (dense or MoE by config), final norm, LM head.

Read top to bottom:  h = embed(ids);  per layer  h += attn(norm(h));  h += ffn(norm(h));  logits = head(norm(h)).
Encoders for images, video and audio plug in before the layers (their features replace placeholder
embeddings); the per-token ``modality`` ids reach every MoE block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..config import Ernie45Config
from .layers import Attention, RMSNorm, SwiGLU, attention_mask, rope_cos_sin
from .moe import ExpertGroup, MoEBlock, Router


class DecoderLayer(nn.Module):
    def __init__(self, config: Ernie45Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp: nn.Module = (
            MoEBlock(config)
            if config.is_moe_layer(layer_idx)
            else SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, rope, mask, cache=None, modality=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, modality) if isinstance(self.mlp, MoEBlock) else self.mlp(x))


class Ernie45PreTrainedModel(PreTrainedModel):
    config: Ernie45Config
    config_class = Ernie45Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"mtp"]
    _keep_in_fp32_modules_strict = ["gate.weight", "e_score_correction_bias"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, ExpertGroup):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)


class Ernie45Model(Ernie45PreTrainedModel):
    """The decoder stack, returning the final hidden states."""

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq = h.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self._default_positions(attention_mask, past, seq, h.device)
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = _layer_mask(attention_mask, seq, past + seq, h.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(layer.__call__, h, rope, mask, None, modality)
            else:
                h = layer(h, rope, mask, cache, modality)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)

    @staticmethod
    def _default_positions(padding_mask, past: int, seq: int, device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded row matches the same row unpadded."""
        if padding_mask is None:
            return (torch.arange(seq, device=device) + past)[None]
        pos = padding_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -seq:]


def _layer_mask(padding_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    if padding_mask is not None and padding_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask covers {padding_mask.shape[-1]} positions but cache + input hold {kv_len}; "
            "it must span the cached and the new tokens"
        )
    return attention_mask(padding_mask, q_len, kv_len, device)


class Ernie45ForConditionalGeneration(Ernie45PreTrainedModel, GenerationMixin):
    """Every ERNIE 4.5 variant: the trunk plus a (tied) LM head; returns ``.logits`` and, with labels, ``.loss``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__(config)
        self.model = Ernie45Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """mm_token_type_ids: per-token modality ids (0 text, 1 image, 2 video, 3 audio); None = all text."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            modality=mm_token_type_ids,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
