"""`ernie45.load_processor`: tokenizer + chat template + media processors -> a model-ready batch."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..config import AudioConfig
from .audio import AudioProcessor, decode_audio
from .chat_template import TEXT_TEMPLATE, VL_TEMPLATE, media_items
from .documents import DocumentOptions, expand_files, is_file_part
from .image import ImageProcessor
from .media import check_cancelled
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids
from .tools import check_tools, prepare_messages
from .video import VideoProcessor

AUDIO_CHUNK_SECONDS = 2.0  # a video's sound is interleaved with its frames in spans of this length
MEDIA_SETTINGS_FILE = "preprocessor_config.json"
IMAGE_SETTINGS = ("min_pixels", "max_pixels")
VIDEO_SETTINGS = (
    "fps",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
    "draw_timestamps",
)


_SHIELDED = re.compile("\ue000(\\d+)\ue001")  # a control token's text from a message (see Processor._shield)


@dataclass
class Processor:
    tokenizer: PreTrainedTokenizerBase
    chat_template: str
    multimodal: bool = False
    hears: bool = False
    image: ImageProcessor = field(default_factory=ImageProcessor)
    video: VideoProcessor = field(default_factory=VideoProcessor)
    audio: AudioProcessor = field(default_factory=AudioProcessor)
    max_document_pages: int = 500  # pages one request's documents may put in a prompt (`ernie45 serve` sets it)

    def __post_init__(self) -> None:
        self._control: re.Pattern | None = None  # the control tokens' texts and the marker (built on first use)
        self.ids = special_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        media = ("image", "image_start", "image_end", "video", "video_start", "video_end", "audio", "audio_start",
                 "audio_end", "cls")  # fmt: skip
        self.hidden_ids = frozenset(self.ids[k] for k in media if k in self.ids)  # never shown in answers

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        """The prompt text of a conversation (rendered by the tokenizer's own Jinja engine)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kw,
        )

    def encode(
        self,
        text: str,
        images: list | None = None,
        videos: list | None = None,
        audios: list | None = None,
        video_audio: list[bool] | None = None,
    ) -> dict[str, Any]:
        """One prompt (one placeholder per media item) -> ids with expanded placeholders + media tensors.

        Placeholders are expanded in prompt order. A video with ``video_audio`` True interleaves, every
        ``AUDIO_CHUNK_SECONDS``, its frame pairs of that span and the span's sound as an audio item.
        """
        return self.encode_ids(self.tokenizer.encode(text, add_special_tokens=False), images, videos, audios,
                               video_audio)  # fmt: skip

    def encode_ids(self, ids: list[int], images: list | None = None, videos: list | None = None,
                   audios: list | None = None, video_audio: list[bool] | None = None,
                   labels: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
        """`encode` on token ids; with `labels`, they are expanded alongside (-100 on media tokens)."""
        videos = videos or []
        queues = {
            "image": iter(images or []),
            "video": iter(zip(videos, video_audio or [False] * len(videos), strict=True)),
            "audio": iter(audios or []),
        }
        kind_of = {self.ids[k]: k for k in queues if k in self.ids}
        out: list[int] = []
        out_labels: list[int] = []
        feats: dict[str, list] = {
            "pixel_values": [],
            "image_grid_thw": [],
            "pixel_values_videos": [],
            "video_grid_thw": [],
            "audio_values": [],
        }
        for n, t in enumerate(ids):
            kind = kind_of.get(t)
            if kind is not None:
                check_cancelled()
            if kind is None:
                out.append(t)
                out_labels.append(labels[n] if labels is not None else t)
                continue
            item = next(queues[kind], None)
            if item is None:
                raise ValueError(f"the prompt has more {SPECIAL_TOKENS[kind]} placeholders than {kind} inputs")
            self._check_can(kind)
            expanded = getattr(self, f"_expand_{kind}")(item, t, feats)
            out.extend(expanded)
            out_labels.extend([-100] * len(expanded))
        for kind, queue in queues.items():
            if next(queue, None) is not None:
                if kind not in self.ids:
                    raise ValueError(f"the tokenizer has no {SPECIAL_TOKENS[kind]} token, so it cannot take {kind}")
                raise ValueError(
                    f"more {kind} inputs than {SPECIAL_TOKENS[kind]} placeholders in the prompt: the "
                    f"text needs one per {kind} (chat messages get them from the chat template)"
                )
        result: dict[str, Any] = {"input_ids": out}
        if labels is not None:
            result["labels"] = out_labels
        if feats["pixel_values"]:
            result["pixel_values"] = torch.from_numpy(np.concatenate(feats["pixel_values"]))
            result["image_grid_thw"] = torch.tensor(feats["image_grid_thw"], dtype=torch.long)
        if feats["pixel_values_videos"]:
            result["pixel_values_videos"] = torch.from_numpy(np.concatenate(feats["pixel_values_videos"]))
            result["video_grid_thw"] = torch.tensor(feats["video_grid_thw"], dtype=torch.long)
        if feats["audio_values"]:
            result.update(self.audio.collate(feats["audio_values"]))
        return result

    def _check_can(self, kind: str) -> None:
        able = self.hears if kind == "audio" else self.multimodal
        if not able:
            raise ValueError(f"this model cannot take {kind} input (it has no {kind} encoder)")

    def _expand_image(self, source, token: int, feats: dict) -> list[int]:
        f = self.image(source)
        feats["pixel_values"].append(f["pixel_values"].numpy())
        grid = f["image_grid_thw"][0].tolist()
        feats["image_grid_thw"].append(grid)
        return [token] * self.image.num_tokens(grid)

    def _expand_audio(self, source, token: int, feats: dict) -> list[int]:
        c = self.audio.config
        mel = self.audio.features(decode_audio(source, c.sample_rate, c.max_seconds))
        feats["audio_values"].append(mel)
        return [token] * self.audio.num_tokens(mel.shape[0])

    def _expand_video(self, item, token: int, feats: dict) -> list[int]:
        source, with_audio = item
        patches, grid, seconds = self.video.load(source)
        feats["pixel_values_videos"].append(patches)
        feats["video_grid_thw"].append(grid)
        if not with_audio:
            return [token] * self.video.num_tokens(grid)
        self._check_can("audio")
        c = self.audio.config
        in_memory = isinstance(source, list | tuple | np.ndarray)  # frames have no sound track
        wave = torch.zeros(0) if in_memory else decode_audio(source, c.sample_rate, c.max_seconds, silent_ok=True)
        if not wave.numel():
            return [token] * self.video.num_tokens(grid)  # a silent video: its frames are all there is
        per_pair = self.video.num_tokens([self.video.temporal_merge_size, grid[1], grid[2]])
        pair_times = seconds[:: self.video.temporal_merge_size]
        chunk = int(AUDIO_CHUNK_SECONDS * c.sample_rate)
        out: list[int] = []
        placed = 0
        for start in range(0, wave.numel(), chunk):
            end_s = (start + chunk) / c.sample_rate
            pairs = sum(1 for t in pair_times[placed:] if t < end_s)
            out += [token] * (pairs * per_pair)
            placed += pairs
            out += [self.ids["audio_start"]] + self._expand_audio(wave[start : start + chunk], self.ids["audio"], feats)
            out += [self.ids["audio_end"]]
        return out + [token] * ((len(pair_times) - placed) * per_pair)

    def encode_chat(self, messages: list[dict], special_tokens_in_content: bool = False,
                    tools: list[dict] | None = None, documents: DocumentOptions | None = None,
                    **template_kw: Any) -> dict[str, Any]:  # fmt: skip
        """A conversation -> model inputs. A control token's text inside a message (`<|end_of_sentence|>`, a media
        placeholder) is encoded as plain text, so content cannot end a turn or open a role; the template's own
        tokens stay control tokens. special_tokens_in_content: parse them in content too. tools: OpenAI function
        tools, listed in the prompt (`processing.tools`); `tool` turns and assistant `tool_calls` are rendered.
        A file part (a PDF, CSV, text) becomes its pages' text and renderings (`processing.documents`);
        documents: its page selection and limits."""
        if any(isinstance(m.get("content"), list) and any(is_file_part(p) for p in m["content"]) for m in messages):
            target = self.image.max_pixels
            options = documents or DocumentOptions(target_pixels=target, max_pages=self.max_document_pages)
            messages = expand_files(messages, options)
        media = media_items(messages)
        literals: list[str] = []
        if not special_tokens_in_content:
            messages = [self._shield(m, literals) for m in messages]
        if tools or any(m.get("role") in ("tool", "developer") or m.get("tool_calls") for m in messages):
            messages, extra = prepare_messages(messages, check_tools(tools), self.chat_template)
            template_kw = {**extra, **template_kw}
        text = self.apply_chat_template(messages, **template_kw)
        if not literals:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:  # the template's text with its control tokens; each shielded token's text as plain text
            ids = []
            for i, piece in enumerate(_SHIELDED.split(text)):
                if i % 2:
                    ids += self.tokenizer.encode(literals[int(piece)], add_special_tokens=False,
                                                 split_special_tokens=True)  # fmt: skip
                elif piece:
                    ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return self.encode_ids(ids, media["image"], media["video"], media["audio"], media["video_audio"])

    def _shield(self, message: dict, literals: list[str]) -> dict:
        """`message` with every control token's text in its content replaced by a marker that names it."""
        if self._control is None:
            tokens = sorted(
                set(self.tokenizer.added_tokens_encoder) | set(self.tokenizer.all_special_tokens), key=len, reverse=True
            ) + ["\ue000"]  # fmt: skip (the marker's own character, as text)
            self._control = re.compile("|".join(re.escape(t) for t in tokens if t))

        def mark(match: re.Match) -> str:
            literals.append(match.group(0))
            return f"\ue000{len(literals) - 1}\ue001"

        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self._control.sub(mark, content)}
        if isinstance(content, list):
            parts = [{**p, "text": self._control.sub(mark, p["text"])} if p.get("type") == "text" and
                     isinstance(p.get("text"), str) else p for p in content]  # fmt: skip
            return {**message, "content": parts}
        return message

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
        for key in (
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
            "audio_values",
            "audio_lengths",
        ):
            parts = [e[key] for e in encoded if key in e]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template) that transformers loads as is,
        and the media settings (preprocessor_config.json)."""
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        settings = {"image": {k: getattr(self.image, k) for k in IMAGE_SETTINGS},
                    "video": {k: getattr(self.video, k) for k in VIDEO_SETTINGS},
                    "sees": self.multimodal,  # what the processor takes even where no config.json lies beside it
                    "audio": dataclasses.asdict(self.audio.config) if self.hears else None}  # fmt: skip
        settings_file = {"processor_class": "Ernie45Processor", "ernie45": settings}  # AutoProcessor reads the class
        (Path(path) / MEDIA_SETTINGS_FILE).write_text(json.dumps(settings_file, indent=2))
        from ..checkpoint.chat_ready import make_chat_ready

        make_chat_ready(path)  # the end-of-turn id into generation_config.json once the model is there too


def load_processor(path: str | Path) -> Processor:
    """Tokenizer + chat template (the checkpoint's own, else the built-in one) + media processors of `path` (a
    directory, or a hub id in the local Hugging Face cache)."""
    from ..hub import resolve

    path = resolve(path)
    tok = load_tokenizer(path)
    config_file = path / "config.json"
    settings_file = path / MEDIA_SETTINGS_FILE
    settings = json.loads(settings_file.read_text()).get("ernie45", {}) if settings_file.is_file() else {}
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        multimodal, audio_config = bool(config.get("vision_config")), config.get("audio_config")
    else:  # a processor saved on its own
        multimodal, audio_config = bool(settings.get("sees")), settings.get("audio")
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    audio = AudioProcessor(AudioConfig.from_dict(audio_config)) if audio_config else AudioProcessor()
    template = template or (VL_TEMPLATE if multimodal or audio_config else TEXT_TEMPLATE)
    proc = Processor(tok, template, multimodal, bool(audio_config), audio=audio)
    if settings:  # our own media settings (other projects' files of this name are ignored)
        for key in IMAGE_SETTINGS:
            if key in settings.get("image", {}):
                setattr(proc.image, key, settings["image"][key])
        for key in VIDEO_SETTINGS:
            if key in settings.get("video", {}):
                setattr(proc.video, key, settings["video"][key])
    return proc
