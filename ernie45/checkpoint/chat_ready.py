"""Checkpoints that chat in any client: what `generate` in transformers (or vLLM) reads from the files.

A chat answer ends with the template's end-of-turn token (`<|end_of_sentence|>`), not only the tokenizer's
EOS; a client that stops only at `eos_token_id` from `generation_config.json` runs on to `max_new_tokens`. And
a model trained with gradient checkpointing had `use_cache` switched off in its config, which makes every
`generate` step recompute the whole prefix. Every writer of a checkpoint (training, `quantize`, `export`, the
demo's `ship`, `Processor.save_pretrained`) finishes with `make_chat_ready`.
"""

from __future__ import annotations

import json
from pathlib import Path

END_OF_TURN = "<|end_of_sentence|>"  # what the ERNIE 4.5 chat templates close an answer with


def token_ids(out: Path) -> dict[str, int]:
    """Special token -> id, from the tokenizer files themselves (tokenizer.json, added_tokens.json)."""
    found: dict[str, int] = {}
    if (out / "tokenizer.json").is_file():
        data = json.loads((out / "tokenizer.json").read_text())
        found.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    if (out / "added_tokens.json").is_file():
        found.update(json.loads((out / "added_tokens.json").read_text()))
    return found


def end_ids(config: dict, out: Path) -> list[int]:
    """The ids that end an answer: the config's EOS, the tokenizer's EOS and the end-of-turn token."""
    ids = config.get("eos_token_id")
    found = list(ids) if isinstance(ids, list) else ([ids] if ids is not None else [])
    specials = token_ids(out)
    tok_file = out / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    found += [specials[t] for t in (eos, END_OF_TURN) if t in specials]
    return list(dict.fromkeys(found))


def make_chat_ready(out: str | Path) -> None:
    """Set `use_cache` on and the end ids in `out`'s config.json and generation_config.json (written if absent)."""
    out = Path(out)
    config_file = out / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["use_cache"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen_file = out / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    for key in ("bos_token_id", "pad_token_id"):
        if key not in gen and config.get(key) is not None:
            gen[key] = config[key]
    ends = end_ids(config, out)
    if ends:
        gen["eos_token_id"] = ends if len(ends) > 1 else ends[0]
    gen["use_cache"] = True
    gen_file.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
