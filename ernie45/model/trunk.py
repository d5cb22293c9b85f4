"""The one trunk of the family: embeddings, decoder layers (dense or MoE by config), final norm, LM head.

Read top to bottom:  h = embed(ids);  per layer  h += attn(norm(h));  h += ffn(norm(h));  logits = head(norm(h)).
Encoders for images, video and audio plug in before the layers (their features replace placeholder
embeddings); the per-token ``modality`` ids reach every MoE block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

from ..attention import FlashMask
from ..config import AudioConfig, Ernie45Config
from .audio import AudioEncoder, AudioResampler
from .layers import Attention, RMSNorm, SwiGLU, attention_mask, rope_cos_sin
from .moe import ExpertGroup, MoEBlock, Router, RouterRecord
from .mtp import mtp_forward, mtp_modules
from .positions import rope_index, text_positions
from .vision import Resampler, VisionConfig, VisionTransformer

# the media encoders' module names: what quantization, packing and the trainer's encoder lr treat apart
ENCODER_MODULES = ("vision_tower", "resampler_model", "audio_tower", "audio_resampler")


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

    def forward(self, h: torch.Tensor, rope, mask, cache=None, modality=None, router_out=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        if isinstance(self.mlp, MoEBlock):
            return h + self.mlp(self.post_attention_layernorm(h), modality, router_out)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.ModuleList):
    """The decoder layers (a ModuleList: the weights keep their `layers.N.` names), run in order."""

    gradient_checkpointing = False  # set by transformers' `gradient_checkpointing_enable`

    records: list | None = None  # the last collecting forward's router records (read by the causal LM)

    def forward(self, h: torch.Tensor, rope, mask, cache=None, modality=None, router_out=None) -> torch.Tensor:
        """router_out: not None asks for, per MoE layer and group, (layer, group, router logits, chosen experts,
        token rows) for the training losses, kept on this module (`records`) as the MoE blocks keep theirs:
        wrappers that rebuild a module's arguments (DeepSpeed ZeRO-3's hooks, on every module) hand it a copy
        of the list, so nothing put in the list ever reached the caller."""
        collected: list | None = None if router_out is None else []
        self.records = collected
        for i, layer in enumerate(self):
            layer_out = None if router_out is None else []  # not None: the MoE block keeps its `records`
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(layer.__call__, h, rope, mask, None, modality, layer_out)
            else:
                h = layer(h, rope, mask, cache, modality, layer_out)
            moe = layer.mlp if isinstance(getattr(layer, "mlp", None), MoEBlock) else None
            if moe is not None and moe.records and collected is not None:
                collected.extend(RouterRecord(i, *entry) for entry in moe.records)
            if moe is not None:
                moe.records = None  # the tensors go with the list the caller takes, not with the module
        return h

    def take_records(self) -> list:
        """The last collecting forward's records, handed over once (the module keeps no tensors)."""
        out, self.records = self.records or [], None
        return out


class Ernie45PreTrainedModel(PreTrainedModel):
    config: Ernie45Config
    config_class = Ernie45Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer", "VisionBlock", "AudioBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"mtp"]
    _keep_in_fp32_modules_strict = ["gate.weight", "e_score_correction_bias"]
    quantized_loader = None  # set by `checkpoint.quantized`: (path, dtype) -> model, for `ernie45 quantize` output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """transformers' loading, except for weight-only quantized checkpoints (`ernie45 quantize`): their codes
        and scales are no `nn.Linear` weights, so they load through ernie45's own loader, as `ernie45.load` does
        (transformers' generic path would fill the model from random weights with only a warning)."""
        config = kwargs.get("config")
        spec = getattr(config, "ernie45_quantization", None) if config is not None else None
        if spec is None and config is None:
            from pathlib import Path

            file = Path(str(pretrained_model_name_or_path)) / "config.json"
            spec = "ernie45_quantization" in file.read_text() if file.is_file() else None
        if not spec:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if cls.quantized_loader is None:
            raise ValueError("a quantized ernie45 checkpoint: load it with ernie45.load(DIR)")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = None if dtype in (None, "auto") else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        device = kwargs.get("device_map")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise ValueError("a quantized ernie45 checkpoint loads onto one device: device_map='cpu' or 'cuda'")
        return cls.quantized_loader(pretrained_model_name_or_path, dtype, None if device == "auto" else device)

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
    """Encoders (if any) + the decoder stack, returning the final hidden states."""

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.vision_config is not None:
            vc = VisionConfig.from_dict(config.vision_config)
            self.vision_tower = VisionTransformer(vc)
            self.resampler_model = Resampler(vc, config.hidden_size, config.rms_norm_eps)
        if config.audio_config is not None:
            ac = AudioConfig.from_dict(config.audio_config)
            self.audio_tower = AudioEncoder(ac)
            self.audio_resampler = AudioResampler(ac, config.hidden_size, config.rms_norm_eps)
        self.layers = DecoderStack([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        for name, modules in mtp_modules(config, DecoderLayer).items():  # none unless num_nextn_predict_layers
            self.add_module(name, modules)
        self.gradient_checkpointing = False
        c = config
        # token id -> modality id: placeholders and their START/END markers route like their media
        # (docs/architecture.md, pitfall 6)
        self.modality_of_token = {
            t: m
            for m, toks in (
                (1, (c.image_token_id, c.image_start_token_id, c.image_end_token_id)),
                (2, (c.video_token_id, c.video_start_token_id, c.video_end_token_id)),
                (3, (c.audio_token_id, c.audio_start_token_id, c.audio_end_token_id)),
            )
            for t in toks
            if t is not None
        }
        self.post_init()

    def modality_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Per-token modality ids derived from the token ids (None for a text-only model)."""
        if not self.modality_of_token or len(self.config.expert_groups) < 2:
            return None
        out = torch.zeros_like(input_ids)
        for token, m in self.modality_of_token.items():
            out = out.masked_fill(input_ids == token, m)
        return out

    def encode_vision(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches [N, 3*14*14] -> one text-width embedding per placeholder token."""
        if not hasattr(self, "vision_tower"):
            raise ValueError("this model has no vision encoder (config.vision_config is None); it takes text only")
        pixels = pixels.to(self.vision_tower.patch_embed.proj.weight.dtype)
        return self.resampler_model(self.vision_tower(pixels, grid_thw), grid_thw)

    def encode_audio(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Log-mel frames of all items [frames, n_mels] -> one text-width embedding per audio placeholder."""
        if not hasattr(self, "audio_tower"):
            raise ValueError("this model has no audio encoder (config.audio_config is None); it cannot hear")
        return self.audio_resampler(self.audio_tower(mels, lengths))

    def _scatter(self, h, input_ids, token_id, features, what: str) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(f"{what} features need input_ids to find their placeholder tokens")
        slots = input_ids == token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt has {int(slots.sum())} {what} placeholder tokens (id {token_id}) but the {what} "
                f"inputs give {features.shape[0]} features; expand each placeholder with the processor"
            )
        return h.masked_scatter(slots[..., None], features.to(h.dtype))

    def positions(self, input_ids, padding_mask, cache, past, seq, device, image_grid_thw, video_grid_thw):
        """Default position ids: 3D for a prompt with media (VL/omni), else 1D (+ the cached decode delta)."""
        c = self.config
        grids = image_grid_thw is not None or video_grid_thw is not None
        if c.freq_allocation and grids and input_ids is not None and past == 0:
            vc = self.vision_tower.config
            spans = {}
            if image_grid_thw is not None:
                spans[c.image_token_id] = (image_grid_thw.tolist(), 1)
            if video_grid_thw is not None:
                spans[c.video_token_id] = (video_grid_thw.tolist(), vc.temporal_merge_size)
            pos, deltas = rope_index(input_ids, spans, vc.spatial_merge_size, padding_mask)
            if cache is not None:
                cache.rope_deltas = deltas  # decoding continues from each row's max + 1
            return pos
        pos = text_positions(None if isinstance(padding_mask, FlashMask) else padding_mask, past, seq, device)
        deltas = getattr(cache, "rope_deltas", None)
        return pos if deltas is None else pos + deltas[:, None]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        router_out: list | None = None,
        keep_trunk_hidden: bool = False,
        **_: Any,
    ) -> BaseModelOutputWithPast:
        """modality: [B, S] ids (0 text, 1 image, 2 video, 3 audio); None derives them from input_ids.
        keep_trunk_hidden: also return the last layer's output before the final norm, with the RoPE tables and the
        mask and positions the layers used, as ``hidden_states = (h, rope, mask, positions)`` (what multi-token
        prediction reads)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        c = self.config
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if pixel_values is not None:
            h = self._scatter(h, input_ids, c.image_token_id, self.encode_vision(pixel_values, image_grid_thw), "image")
        if pixel_values_videos is not None:
            feats = self.encode_vision(pixel_values_videos, video_grid_thw)
            h = self._scatter(h, input_ids, c.video_token_id, feats, "video")
        if audio_values is not None:
            lengths = audio_lengths if audio_lengths is not None else torch.tensor([audio_values.shape[0]])
            h = self._scatter(h, input_ids, c.audio_token_id, self.encode_audio(audio_values, lengths), "audio")
        if modality is None and input_ids is not None:
            modality = self.modality_ids(input_ids)
        seq = h.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self.positions(
                input_ids, attention_mask, cache, past, seq, h.device, image_grid_thw, video_grid_thw
            )
        rope = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.freq_allocation)
        mask = _layer_mask(attention_mask, seq, past + seq, h.device)
        h = self.layers(h, rope, mask, cache, modality, router_out)
        if router_out is not None:  # a direct caller's list (the causal LM reads the stack's `records` instead:
            router_out.extend(self.layers.records or [])  # under ZeRO-3 the list it passed reaches here as a copy)
        kept = (h, rope, mask, position_ids) if keep_trunk_hidden else None
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache, hidden_states=kept)

    def mtp_row(self, trunk_hidden, mask, position_ids, input_ids, passes: int = 1) -> list[torch.Tensor]:
        """Training: the MTP block over a whole row, `passes` times; in pass j (from 0) slot i predicts t_{i+2+j}.
        Pass 0 reads (h_i, embed(t_{i+1})) at t_{i+1}'s position; pass j > 0 reads pass j-1's output at slot i and
        embed(t_{i+1+j}), one position on: what the engine's chained drafts feed the block. Slots past the row's
        end get a zero embedding; the row keeps its length, so the trunk's mask applies as it is (pairs that
        straddle a packed row's document boundary are left in: a few tokens per boundary). Returns each pass's
        output after the final norm."""
        outs, h = [], trunk_hidden
        for j in range(passes):
            shift = 1 + j
            nxt = torch.cat([self.embed_tokens(input_ids[:, shift:]), torch.zeros_like(trunk_hidden[:, :shift])], 1)
            after = position_ids[..., -1:] + torch.arange(1, shift + 1, device=position_ids.device)
            pos = torch.cat([position_ids[..., shift:], after], dim=-1)
            h = mtp_forward(self, h, nxt.to(trunk_hidden.dtype), pos, mask)
            outs.append(self.norm(h))
        return outs


def _layer_mask(padding_mask, q_len: int, kv_len: int, device) -> torch.Tensor | FlashMask | None:
    if isinstance(padding_mask, FlashMask):
        return padding_mask.to(device)
    if padding_mask is not None and padding_mask.dim() == 4:  # explicit [B, 1, Sq, Sk] bool: used as given
        return padding_mask.to(device)
    if padding_mask is not None and padding_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask covers {padding_mask.shape[-1]} positions but cache + input hold {kv_len}; "
            "it must span the cached and the new tokens"
        )
    return attention_mask(padding_mask, q_len, kv_len, device)


@dataclass
class Ernie45CausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output plus, when asked (`output_mtp_logits`), the MTP block's logits [B, S, V]: slot i
    predicts the token at i + 2; and, when asked (`output_trunk_hidden`), the last layer's output before the final
    norm [B, S, H] (what the MTP block reads: the engine keeps a prompt's last ones for MTP drafting)."""

    mtp_logits: torch.Tensor | None = None
    mtp_chain_logits: tuple[torch.Tensor, ...] | None = None
    trunk_hidden: torch.Tensor | None = None


class Ernie45ForConditionalGeneration(Ernie45PreTrainedModel, GenerationMixin):
    """Every ERNIE 4.5 variant: the trunk plus a (tied) LM head; returns ``.logits`` and, with labels, ``.loss``."""

    _tp_plan = {"lm_head": "colwise_gather_output"}  # the head split by vocabulary, gathered into whole logits

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
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        moe_mm_token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool = False,
        output_mtp_logits: bool = False,
        output_mtp_chain: int = 0,
        output_trunk_hidden: bool = False,
        **kwargs: Any,
    ) -> Ernie45CausalLMOutput:
        """Keyword names follow transformers' VL model, so a batch from either processor runs on either model.

        moe_mm_token_type_ids / mm_token_type_ids: per-token modality ids (0 text, 1 image, 2 video, 3 audio)
        that pick each token's expert group; by default they are derived from the token ids.
        output_router_logits: also return, per MoE layer and group, a `moe.RouterRecord` (layer, group, router
        logits, chosen experts, token rows) in ``.router_logits`` (what the MoE training losses read).
        output_mtp_logits: also return the multi-token-prediction block's logits (``.mtp_logits``, training).
        output_mtp_chain: n > 0: also the logits of n more passes of the block, each on the one before's output
            (``.mtp_chain_logits``: pass j's slot i predicts the token at i + 2 + j; the engine's chained drafts).
        output_trunk_hidden: also return the last layer's output before the final norm (``.trunk_hidden``).
        """
        if (output_mtp_logits or output_mtp_chain) and not self.config.num_nextn_predict_layers:
            raise ValueError("output_mtp_logits: this model has no MTP block (config.num_nextn_predict_layers is 0)")
        output_mtp_logits = output_mtp_logits or bool(output_mtp_chain)
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
            modality=moe_mm_token_type_ids
            if moe_mm_token_type_ids is not None
            else (mm_token_type_ids if input_ids is None else None),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            audio_values=audio_values,
            audio_lengths=audio_lengths,
            router_out=[] if output_router_logits else None,
            keep_trunk_hidden=output_mtp_logits or output_trunk_hidden,
        )
        router_out = self.model.layers.take_records() if output_router_logits else None
        mtp_logits = trunk_h = chain = None
        if output_mtp_logits or output_trunk_hidden:
            trunk_h, _, mask, pos = out.hidden_states
        if output_mtp_logits:
            rows = self.model.mtp_row(trunk_h, mask, pos, input_ids, 1 + output_mtp_chain)
            passes = [self.lm_head(h) for h in rows]
            mtp_logits, chain = passes[0], tuple(passes[1:]) or None
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):  # one position per row: [B] indices
            h = h[torch.arange(h.shape[0], device=h.device), logits_to_keep.to(h.device)][:, None]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        kept = trunk_h if output_trunk_hidden else None
        return Ernie45CausalLMOutput(loss=loss, logits=logits, cache=cache, router_logits=router_out,
                                     mtp_logits=mtp_logits, mtp_chain_logits=chain, trunk_hidden=kept)  # fmt: skip
