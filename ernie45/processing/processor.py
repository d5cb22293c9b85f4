"""`ernie45.load_processor`: tokenizer + chat template + media processors -> a model-ready batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .chat_template import TEXT_TEMPLATE, VL_TEMPLATE, media_items
from .image import ImageProcessor
from .placeholders import expand_ids
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids
from .video import VideoProcessor


@dataclass
class Processor:
    tokenizer: PreTrainedTokenizerBase
    chat_template: str
    multimodal: bool = False
    image: ImageProcessor = field(default_factory=ImageProcessor)
    video: VideoProcessor = field(default_factory=VideoProcessor)

    def __post_init__(self) -> None:
        self.ids = special_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        """The prompt text of a conversation (rendered by the tokenizer's own Jinja engine)."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
            tokenize=False, **kw,
        )  # fmt: skip

    def encode(self, text: str, images: list | None = None, videos: list | None = None) -> dict[str, Any]:
        """One prompt (with one placeholder per media item) -> ids with expanded placeholders + media tensors."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out: dict[str, Any] = {}
        for kind, items, proc in (("image", images, self.image), ("video", videos, self.video)):
            if not items:
                continue
            if kind not in self.ids:
                raise ValueError(f"the tokenizer has no {SPECIAL_TOKENS[kind]} token, so it cannot take {kind}s")
            if not self.multimodal:
                raise ValueError(f"this model takes text only; it cannot read {kind}s")
            feats = proc(list(items))
            grids = feats[f"{kind}_grid_thw"].tolist()
            ids = expand_ids(ids, self.ids[kind], [proc.num_tokens(g) for g in grids])
            out.update(feats)
        out["input_ids"] = ids
        return out

    def encode_chat(self, messages: list[dict], **template_kw: Any) -> dict[str, Any]:
        media = media_items(messages)
        if media["audio"]:
            raise ValueError("audio input is not supported by this model")
        text = self.apply_chat_template(messages, **template_kw)
        return self.encode(text, media["image"] or None, media["video"] or None)

    def collate(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-pad a list of `encode` results into one batch (media tensors concatenated in row order)."""
        width = max(len(e["input_ids"]) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[i, width - n :] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, width - n :] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [e[key] for e in encoded if key in e]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template) that transformers loads as is."""
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)


def load_processor(path: str | Path) -> Processor:
    """Tokenizer + chat template (the checkpoint's own, else the built-in one) + media processors of `path`."""
    path = Path(path)
    tok = load_tokenizer(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    multimodal = bool(config.get("vision_config"))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return Processor(tok, template or (VL_TEMPLATE if multimodal else TEXT_TEMPLATE), multimodal)
