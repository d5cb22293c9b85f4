"""`Ernie45Processor`: ernie45's processor as a transformers `ProcessorMixin`, registered with `AutoProcessor`.

So the standard multimodal recipe works on every checkpoint ernie45 reads or writes::

    processor = AutoProcessor.from_pretrained(DIR)
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    model.generate(**inputs)

and `pipeline("image-text-to-text", model=DIR)` too. The work is `Processor`'s (tokenizer, chat template,
image / video / audio encoders and the placeholder expansion the model expects); this class only speaks
transformers' calling conventions. Media that would be dropped is refused: a text without a placeholder for
each image, video or audio given is an error, not a prompt that silently ignores it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import BatchFeature, ProcessorMixin

from .chat_template import MEDIA_PARTS
from .processor import Processor, load_processor


class Ernie45Processor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, chat_template: str | None = None, processor: Processor | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        if processor is None:
            if tokenizer is None:
                raise ValueError("Ernie45Processor needs a tokenizer (or use Ernie45Processor.from_pretrained(DIR))")
            from .chat_template import VL_TEMPLATE

            processor = Processor(tokenizer, chat_template or tokenizer.chat_template or VL_TEMPLATE)
        self.inner = processor
        super().__init__(processor.tokenizer, chat_template=processor.chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Ernie45Processor:
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            from ..hub import resolve

            path = resolve(str(pretrained_model_name_or_path))
        return cls(processor=load_processor(path))

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> list[str]:
        self.inner.save_pretrained(save_directory)
        return [str(save_directory)]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "audio_values", "audio_lengths"]  # fmt: skip

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors: str | None = "pt",
                 **kwargs: Any) -> BatchFeature:  # fmt: skip
        """Texts (with one placeholder per media item, as the chat template writes them) and their media."""
        if text is None:
            raise ValueError("Ernie45Processor needs text: the prompt, with one placeholder per media item "
                             "(apply_chat_template writes them for you)")  # fmt: skip
        texts = [text] if isinstance(text, str) else list(text)
        kw = kwargs.pop("audios", None)
        audio = audio if audio is not None else kw
        _batch_options(return_tensors, kwargs)
        media = {"image": _flat(images), "video": _flat(videos), "audio": _flat(audio)}
        token = {k: self.inner.tokenizer.convert_tokens_to_ids(f"<|{k.upper()}_PLACEHOLDER|>") for k in media}
        encoded = []
        for t in texts:
            ids = self.inner.tokenizer.encode(t, add_special_tokens=False)
            take = {k: [media[k].pop(0) for _ in range(min(ids.count(token[k]), len(media[k])))] for k in media}
            encoded.append(self.inner.encode_ids(ids, take["image"], take["video"], take["audio"]))
        left = {k: len(v) for k, v in media.items() if v}
        if left:
            what = ", ".join(f"{n} {k}" for k, n in left.items())
            raise ValueError(f"{what} given but the text has no placeholder left for them: put one "
                             f"<|IMAGE_PLACEHOLDER|> (video: <|VIDEO_PLACEHOLDER|>, audio: <|AUDIO_PLACEHOLDER|>) "
                             f"per item in the text, or build it with apply_chat_template")  # fmt: skip
        batch = self.inner.collate(encoded)
        return BatchFeature(dict(batch), tensor_type=None if return_tensors is None else "pt")

    def apply_chat_template(self, conversation, chat_template: str | None = None, tokenize: bool = False,
                            return_dict: bool = False, add_generation_prompt: bool = True, **kwargs: Any):  # fmt: skip
        """The conversation (or a list of them) rendered by the checkpoint's template; with `tokenize=True` the
        model inputs, media included (parts: {"type": "image", "image" | "url" | "path": ...}, video, audio)."""
        convs = conversation if conversation and isinstance(conversation[0], list) else [conversation]
        convs = [_openai_shaped(c) for c in convs]
        template_kw = {k: kwargs.pop(k) for k in TEMPLATE_OPTIONS if k in kwargs}
        extra = kwargs.pop("processor_kwargs", None) or {}
        _batch_options(kwargs.pop("return_tensors", "pt"), {**extra, **kwargs})
        inner = self.inner if chat_template is None else dataclasses.replace(self.inner, chat_template=chat_template)
        if not tokenize:
            texts = [inner.apply_chat_template(c, add_generation_prompt, **template_kw) for c in convs]
            return texts if isinstance(conversation[0], list) else texts[0]
        encoded = [inner.encode_chat(c, add_generation_prompt=add_generation_prompt, **template_kw)
                   for c in convs]  # fmt: skip
        batch = BatchFeature(dict(self.inner.collate(encoded)), tensor_type="pt")
        return batch if return_dict else batch["input_ids"]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.inner.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.inner.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs: Any):
        return self.inner.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens)


TEMPLATE_OPTIONS = ("enable_thinking", "continue_final_message", "tools", "documents")


def _batch_options(return_tensors, options: dict) -> None:
    """The batch options transformers' callers pass that mean something here (tensors are torch, rows are
    padded to the longest); anything else is refused by name rather than dropped."""
    if return_tensors not in (None, "pt"):
        raise ValueError(f"Ernie45Processor returns torch tensors: return_tensors='pt' (got {return_tensors!r})")
    if options.get("padding", True) not in (True, "longest"):
        raise ValueError("Ernie45Processor pads every row to the longest (padding=True); "
                         f"padding={options['padding']!r} is not supported")  # fmt: skip
    if options.get("truncation") or options.get("max_length") is not None:
        raise ValueError("Ernie45Processor does not truncate: a prompt is never cut silently; shorten it instead")
    unknown = sorted(set(options) - {"padding", "truncation", "max_length"})
    if unknown:
        raise TypeError(f"Ernie45Processor does not take {', '.join(unknown)}")


def _flat(items) -> list:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    out = []
    for x in items:
        out.extend(_flat(x) if isinstance(x, (list, tuple)) else [x])
    return out


def _openai_shaped(messages: list[dict]) -> list[dict]:
    """transformers' part forms ({"type": "image", "url" | "path" | "base64": ...}) in the form `Processor`
    reads ({"type": "image", "image": source})."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if any(kind in names for names in MEDIA_PARTS.values()) and part.get(kind) is None:
                    source = part.get("url") or part.get("path")
                    if source is None and part.get("base64"):
                        source = f"data:application/octet-stream;base64,{part['base64']}"
                    if source is None:
                        raise ValueError(f"a {kind} part has none of {kind!r}, 'url', 'path', 'base64': {part}")
                    part = {**part, kind: source}
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out
