"""The demo model's tokenizer: byte-level BPE trained on the demo's own text, in the official file layout
(tokenizer.json + tokenizer_config.json + special_tokens_map.json + added_tokens.json) with every ERNIE
special token at fixed ids 0-15."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..processing.tokenizer import SPECIAL_TOKENS
from .tasks import corpus

BASE = ["<unk>", "<s>", "</s>"]
SPECIALS = BASE + list(SPECIAL_TOKENS.values())  # ids 0..15, fixed: the demo preset names them


def build_tokenizer(out: str | Path, vocab_size: int = 4096, seed: int = 1234) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus(seed=seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        cls_token=SPECIAL_TOKENS["cls"], sep_token=SPECIAL_TOKENS["sep"],
        additional_special_tokens=list(SPECIAL_TOKENS.values()),
    )  # fmt: skip
    fast.save_pretrained(out)
    (out / "added_tokens.json").write_text(json.dumps({t: fast.convert_tokens_to_ids(t) for t in SPECIALS[3:]}))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
        "cls_token": SPECIAL_TOKENS["cls"], "sep_token": SPECIAL_TOKENS["sep"],
        "additional_special_tokens": list(SPECIAL_TOKENS.values()),
    }))  # fmt: skip
    return out
