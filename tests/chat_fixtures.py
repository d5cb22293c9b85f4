"""Real tokenizers trained in the test session, in the official ERNIE file layout, and tiny chat checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ernie45 import Ernie45Config, Ernie45ForConditionalGeneration
from ernie45.processing.tokenizer import SPECIAL_TOKENS

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "ERNIE is a family of models.",
    "你好，世界。今天天气很好。",
    "Numbers 12345 and symbols #@!",
    "User: What is in the picture?\nAssistant: A cat.",
    "Picture 1: a photo of a red apple on a table.",
    "Video 1: a person walking in the park.",
]
EXTRA = ["<|begin_of_sentence|>", "<|end_of_sentence|>"] + [
    t for t in SPECIAL_TOKENS.values() if t not in ("<|begin_of_sentence|>", "<|end_of_sentence|>")
]


def write_spm_tokenizer(path: Path) -> None:
    """sentencepiece tokenizer.model + tokenizer_config / special_tokens_map / added_tokens, as ERNIE ships."""
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 40))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    added = {t: 400 + i for i, t in enumerate(EXTRA)}
    (path / "added_tokens.json").write_text(json.dumps(added))
    specials = dict(
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        cls_token="<|begin_of_sentence|>",
        sep_token="<|end_of_sentence|>",
    )
    (path / "special_tokens_map.json").write_text(json.dumps({**specials, "additional_special_tokens": EXTRA}))
    config = dict(
        specials,
        tokenizer_class="Ernie4_5_Tokenizer",
        add_bos_token=False,
        add_eos_token=False,
        auto_map={"AutoTokenizer": ["tokenization_ernie4_5.Ernie4_5_Tokenizer", None]},
        additional_special_tokens=EXTRA,
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_chat_config(vocab: int, vision: bool = False, audio: bool = False, **overrides) -> Ernie45Config:
    ids = {t: 400 + i for i, t in enumerate(EXTRA)}
    kw = dict(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        moe_k=2,
        moe_num_shared_experts=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        expert_groups=[dict(name="text", num_experts=4, intermediate_size=24, modalities=[0, 1, 2, 3])],
    )
    if vision:
        kw["expert_groups"] = [
            dict(name="text", num_experts=4, intermediate_size=24, modalities=[0]),
            dict(name="vision", num_experts=4, intermediate_size=16, modalities=[1, 2]),
        ]
        kw["vision_config"] = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2)
        kw["freq_allocation"] = 4
        kw.update(
            image_token_id=ids["<|IMAGE_PLACEHOLDER|>"],
            image_start_token_id=ids["<|IMAGE_START|>"],
            image_end_token_id=ids["<|IMAGE_END|>"],
            video_token_id=ids["<|VIDEO_PLACEHOLDER|>"],
            video_start_token_id=ids["<|VIDEO_START|>"],
            video_end_token_id=ids["<|VIDEO_END|>"],
        )
    if audio:  # a width-scaled copy of the omni preset's layout: text, vision and audio groups
        kw["expert_groups"] = [
            *kw["expert_groups"][:2],
            dict(name="audio", num_experts=4, intermediate_size=16, modalities=[3]),
        ]
        kw["audio_config"] = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
        kw.update(
            audio_token_id=ids["<|AUDIO_PLACEHOLDER|>"],
            audio_start_token_id=ids["<|AUDIO_START|>"],
            audio_end_token_id=ids["<|AUDIO_END|>"],
        )
    kw.update(overrides)
    return Ernie45Config(**kw)


def write_chat_checkpoint(
    path: Path, vision: bool = False, seed: int = 0, endless: bool = False, audio: bool = False
) -> Path:
    """A tiny random ernie45 checkpoint with a real tokenizer beside it.

    endless: greedy decoding never picks an end or an invisible token (for tests that interrupt an answer).
    """
    write_spm_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_chat_config(400 + len(EXTRA), vision=vision or audio, audio=audio, tie_word_embeddings=not endless)
    model = Ernie45ForConditionalGeneration(config)
    with torch.no_grad():  # larger than the 0.02 init, so the context (not only the last token) steers
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("gate.weight"):
                p.normal_(0, 0.2)
        if endless:
            model.lm_head.weight[[0, 1, 2, 400, 401, 411, 412]] = 0.0
    model.save_pretrained(path)
    return path
