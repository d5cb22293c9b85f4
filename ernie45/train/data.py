"""Training records -> tokenised samples: chat conversations (with media), plain text, DPO triples.

Chat loss falls on assistant text (and its end marker) by default: the rendered conversation is tokenised
once with character offsets, and a token is a target when it lies inside an assistant span. Media
placeholders expand after labelling and are never targets. A bad record is reported with its file and
line and then skipped or fatal (``on_error``) -- never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..processing.chat_template import media_items
from ..processing.processor import Processor

log = logging.getLogger("ernie45.train")
KINDS = ("chat", "pretrain", "dpo")


class DataError(ValueError):
    """A training record that cannot be used; names the file and line."""


@dataclass
class Sample:
    """One tokenised record. ``answers``: DPO (chosen, rejected) token ids after the prompt in input_ids."""

    input_ids: list[int]
    labels: list[int]
    media: dict[str, Any] = field(default_factory=dict)
    answers: tuple[int, int] | None = None  # DPO: lengths of the chosen and rejected answers
    ref_logps: tuple[float, float] | None = None  # DPO: precomputed reference log-probs (chosen, rejected)
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _end_marker(proc: Processor) -> str:
    return SEP if SEP in proc.tokenizer.get_vocab() else (proc.tokenizer.eos_token or "")


def tokenize_chat(proc: Processor, messages: list[dict], loss_on: str = "assistant") -> Sample:
    """A conversation -> ids and labels (targets on assistant turns, or on everything with loss_on="all").

    The final assistant turn follows the generation prompt exactly as inference renders it, so what is
    learned is what `LLM.chat` asks for; earlier turns keep their history form.
    """
    tok = proc.tokenizer
    final = messages[-1]["role"] == "assistant"
    head = messages[:-1] if final else messages
    text = proc.apply_chat_template(head, add_generation_prompt=final)
    spans = []
    for i, m in enumerate(head):
        if m["role"] != "assistant":
            continue
        before = proc.apply_chat_template(head[:i], add_generation_prompt=False) if i else ""
        upto = proc.apply_chat_template(head[: i + 1], add_generation_prompt=False)
        answer = _text_of(m["content"])
        start = upto.find(answer, len(before)) if answer else len(upto)
        if not text.startswith(upto) or start < 0:
            raise DataError("the chat template does not render this conversation turn by turn")
        spans.append((start, len(upto)))
    if final:
        spans.append((len(text), len(text) + len(_text_of(messages[-1]["content"])) + len(_end_marker(proc))))
        text += _text_of(messages[-1]["content"]) + _end_marker(proc)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if loss_on == "all":
        labels = list(ids)
    else:
        offsets = enc["offset_mapping"]
        labels = [t if any(a <= lo < b for a, b in spans) else -100 for t, (lo, _) in zip(ids, offsets, strict=True)]
    media = media_items(messages)
    out = proc.encode_ids(ids, media["image"], media["video"], media["audio"], media["video_audio"], labels=labels)
    return Sample(out.pop("input_ids"), out.pop("labels"), out)


def tokenize_text(proc: Processor, text: str) -> Sample:
    tok = proc.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return Sample(ids, list(ids))


def tokenize_dpo(proc: Processor, prompt, chosen: str, rejected: str) -> Sample:
    """prompt + chosen + rejected in one row; labels mark both answers (their log-probs are compared)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    enc = proc.encode_chat(messages)
    end = _end_marker(proc)
    prompt_ids = enc.pop("input_ids")
    answers = [proc.tokenizer.encode(a + end, add_special_tokens=False) for a in (chosen, rejected)]
    ids = prompt_ids + answers[0] + answers[1]
    labels = [-100] * len(prompt_ids) + answers[0] + answers[1]
    return Sample(ids, labels, enc, answers=(len(answers[0]), len(answers[1])))


SEP = "<|end_of_sentence|>"


def read_records(path: str | Path) -> list[tuple[str, int, dict]]:
    """(file, line number, record) for each non-empty JSONL line; a malformed line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((str(path), n, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((str(path), n, {"__error__": f"not JSON ({e.msg})"}))
    return out


def load_samples(proc: Processor, files: list[str | Path], kind: str = "chat", loss_on: str = "assistant",
                 on_error: str = "skip", max_len: int | None = None) -> tuple[list[Sample], list[str]]:  # fmt: skip
    """Tokenise every record of `files`; returns the samples and the problems (file:line: why)."""
    if kind not in KINDS:
        raise DataError(f"data kind {kind!r}: choose one of {KINDS}")
    samples, problems = [], []
    for file, line, rec in (r for f in files for r in read_records(f)):
        where = f"{file}:{line}"
        try:
            if "__error__" in rec:
                raise DataError(rec["__error__"])
            sample = _tokenize(proc, rec, kind, loss_on)
            if max_len and len(sample) > max_len:
                raise DataError(f"{len(sample)} tokens, longer than the {max_len}-token budget")
            if not any(t != -100 for t in sample.labels):
                raise DataError("no target tokens (nothing to learn)")
        except (DataError, ValueError, KeyError, TypeError) as e:
            msg = f"{where}: {e}"
            if on_error == "fail":
                raise DataError(msg) from None
            log.warning("skipping %s", msg)
            problems.append(msg)
            continue
        sample.source = where
        samples.append(sample)
    return samples, problems


def _tokenize(proc: Processor, rec: dict, kind: str, loss_on: str) -> Sample:
    if kind == "chat":
        if not isinstance(rec.get("messages"), list) or not rec["messages"]:
            raise DataError('a chat record needs "messages": [{"role": ..., "content": ...}, ...]')
        return tokenize_chat(proc, rec["messages"], loss_on)
    if kind == "pretrain":
        if not isinstance(rec.get("text"), str) or not rec["text"]:
            raise DataError('a pretraining record needs a non-empty "text"')
        return tokenize_text(proc, rec["text"])
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise DataError(f'a DPO record needs "prompt", "chosen" and "rejected"; "{key}" is missing')
    sample = tokenize_dpo(proc, rec["prompt"], rec["chosen"], rec["rejected"])
    if "ref_chosen_logp" in rec or "ref_rejected_logp" in rec:
        sample.ref_logps = (float(rec["ref_chosen_logp"]), float(rec["ref_rejected_logp"]))
    return sample
