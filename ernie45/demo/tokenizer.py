"""The demo model's tokenizer: byte-level BPE trained on the demo's own text, in the official file layout
(tokenizer.json + tokenizer_config.json + special_tokens_map.json + added_tokens.json) with every ERNIE
special token at fixed ids 0-15."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..checkpoint.files import written_atomically
from ..processing.tokenizer import SPECIAL_TOKENS
from .tasks import corpus

BASE = ["<unk>", "<s>", "</s>"]
SPECIALS = BASE + list(SPECIAL_TOKENS.values())  # ids 0..15, fixed: the demo preset names them


def build_tokenizer(out: str | Path, vocab_size: int = 4096, seed: int = 1234) -> Path:
    with written_atomically(out) as tmp:  # the ranks of a run all build it; none reads a half-written file
        _build(tmp, vocab_size, seed)
    return Path(out)


def _build(out: Path, vocab_size: int, seed: int) -> None:
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


def split_numbers(tokenizer: PreTrainedTokenizerBase) -> int:
    """Drop the BPE merges that join two digits, in place: every number becomes its first digit (with the space
    before it) and then one token per digit ("47" -> "Ġ4", "7"; "100" -> "Ġ1", "0", "0"). Trained on this text,
    byte-level BPE had merged some numbers into one token and split others ("38" -> "Ġ38", "47" -> "Ġ4", "7"), so
    sums had no regular form to learn. The vocabulary and every id stay (single digits keep their tokens); only
    how numbers are cut changes. Returns how many merges went."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = state["model"]["merges"]
    pairs = [m if isinstance(m, list) else m.split(" ") for m in merges]
    keep = [m for m, (a, b) in zip(merges, pairs, strict=True) if not (a[-1].isdigit() and b[0].isdigit())]
    state["model"]["merges"] = keep
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return len(merges) - len(keep)
