"""Loading an ERNIE 4.5 tokenizer through transformers (tokenizers / sentencepiece), never by hand.

Official checkpoints ship a sentencepiece ``tokenizer.model`` with ``tokenizer_config.json``,
``special_tokens_map.json`` and ``added_tokens.json`` and name a remote-code class
(``Ernie4_5_Tokenizer``); converted ones ship ``tokenizer.json``. Both load here without remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, TokenizersBackend

# The special tokens of docs/architecture.md §5, by role.
SPECIAL_TOKENS = {
    "cls": "<|begin_of_sentence|>",
    "sep": "<|end_of_sentence|>",
    "image": "<|IMAGE_PLACEHOLDER|>",
    "image_start": "<|IMAGE_START|>",
    "image_end": "<|IMAGE_END|>",
    "video": "<|VIDEO_PLACEHOLDER|>",
    "video_start": "<|VIDEO_START|>",
    "video_end": "<|VIDEO_END|>",
    "audio": "<|AUDIO_PLACEHOLDER|>",
    "audio_start": "<|AUDIO_START|>",
    "audio_end": "<|AUDIO_END|>",
    "think": "<think>",
    "think_end": "</think>",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(ValueError):
    """A checkpoint directory without a usable tokenizer."""


MEDIA_KWARGS = ("images", "videos", "audio", "audios")


class Ernie45Tokenizer(TokenizersBackend):
    """The fast tokenizer of ernie45's own checkpoints. It reads text only, and says so when handed media
    (transformers' tokenizers drop an `images=` argument without a word; the model would answer blind)."""

    def __call__(self, *args, **kwargs):
        given = [k for k in MEDIA_KWARGS if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"a tokenizer reads text only; the {given[0]} would be dropped. Use the processor: "
                "transformers.AutoProcessor.from_pretrained(DIR) (or ernie45.load_processor(DIR)), then "
                "processor.apply_chat_template(messages, tokenize=True, return_dict=True)"
            )
        return super().__call__(*args, **kwargs)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of checkpoint directory `path` (tokenizer.json or sentencepiece tokenizer.model)."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{path} has no tokenizer (expected tokenizer.json or tokenizer.model)")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    cls_name = config.get("tokenizer_class")
    try:
        if (path / "tokenizer.json").is_file():
            ours = _unknown(cls_name) or cls_name in ("TokenizersBackend", "Ernie45Tokenizer")
            tok = Ernie45Tokenizer.from_pretrained(path) if ours else AutoTokenizer.from_pretrained(path)
        else:  # sentencepiece: converted to a fast tokenizer by transformers (needs sentencepiece + protobuf)
            kwargs = {"add_bos_token": config.get("add_bos_token", False), "add_eos_token": False}
            tok = (
                LlamaTokenizer.from_pretrained(path, **kwargs)
                if _unknown(cls_name)
                else AutoTokenizer.from_pretrained(path)
            )
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: the tokenizer files could not be read ({e})") from None
    return tok


def _unknown(cls_name: str | None) -> bool:
    """True for remote-code classes (such as Ernie4_5_Tokenizer) that transformers does not ship."""
    if not cls_name or cls_name == "Ernie45Tokenizer":
        return True
    import transformers

    return not hasattr(transformers, cls_name) and not hasattr(transformers, cls_name.removesuffix("Fast"))


def special_token_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Role -> id for the special tokens this tokenizer has (a single token each)."""
    vocab = tok.get_vocab()
    return {role: vocab[t] for role, t in SPECIAL_TOKENS.items() if t in vocab}
