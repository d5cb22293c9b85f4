"""Checkpoint key mappings as data: one table of rules per checkpoint family, read both ways.

A rule pairs a checkpoint key template (``theirs``) with an ernie45 parameter template (``ours``) and
says which part of our parameter the checkpoint tensor fills:

- ``whole``: the tensor is the parameter (optionally transposed);
- ``gate`` / ``up``: expert ``e``'s gate or up half of the stacked ``gate_up_proj[e]``;
- ``expert``: expert ``e``'s slice ``param[e]`` (``down_proj``);
- ``row``: one row per expert group (the correction bias ``[G, E]`` of the official layout), or, when
  the key names its ``{group}``, that group's own ``[1, E]`` row.

Template fields: ``{layer}`` a layer index, ``{expert}`` the checkpoint's global expert index (groups are
numbered one after the other: text 0..63, vision 64..127), ``{group}`` a group name, ``{rest}`` anything.
Rules are tried in order; ``export=False`` marks input-only alternatives (transformers-5 names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FIELDS = {"layer": r"\d+", "expert": r"\d+", "group": r"[a-z]+", "rest": r".+"}


@dataclass(frozen=True)
class Rule:
    theirs: str
    ours: str
    part: str = "whole"
    transpose: bool = False
    export: bool = True
    _re: re.Pattern = field(init=False, repr=False, compare=False)
    _ours_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_re", _compile(self.theirs))
        object.__setattr__(self, "_ours_re", _compile(self.ours))

    def match(self, key: str) -> dict[str, str] | None:
        m = self._re.fullmatch(key)
        return m.groupdict() if m else None

    def match_ours(self, key: str) -> dict[str, str] | None:
        m = self._ours_re.fullmatch(key)
        return m.groupdict() if m else None


def _compile(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


_L = "model.layers.{layer}"
_G = _L + ".mlp.groups.{group}"

IDENTITY: tuple[Rule, ...] = (Rule("{rest}", "{rest}"),)

# ernie4_5 (dense) and ernie4_5_moe: the official -PT layout (per-expert keys) and transformers-5's names.
TEXT: tuple[Rule, ...] = (
    Rule(_L + ".mlp.experts.{expert}.gate_proj.weight", _G + ".gate_up_proj", part="gate"),
    Rule(_L + ".mlp.experts.{expert}.up_proj.weight", _G + ".gate_up_proj", part="up"),
    Rule(_L + ".mlp.experts.{expert}.down_proj.weight", _G + ".down_proj", part="expert"),
    Rule(_L + ".mlp.gate.weight", _L + ".mlp.groups.text.gate.weight"),
    Rule(_L + ".mlp.moe_statics.e_score_correction_bias", _G + ".gate.e_score_correction_bias", part="row"),
    Rule(_L + ".mlp.experts.gate_up_proj", _L + ".mlp.groups.text.gate_up_proj", export=False),
    Rule(_L + ".mlp.experts.down_proj", _L + ".mlp.groups.text.down_proj", export=False),
    Rule(
        _L + ".mlp.gate.moe_statics.e_score_correction_bias",
        _G + ".gate.e_score_correction_bias",
        part="row",
        export=False,
    ),
    Rule("{rest}", "{rest}"),
)

_HL = "model.language_model.layers.{layer}.mlp.{group}_moe"
_RS = "model.resampler_model."

# VL (ernie4_5_moe_vl original / ernie4_5_vl_moe transformers-5): experts 0..E-1 text, E..2E-1 vision;
# gates stored transposed as ``weight`` (text) / ``weight_1`` (vision); bias rows [text, vision].
VL: tuple[Rule, ...] = (
    *TEXT[:3],
    Rule(_L + ".mlp.gate.weight", _L + ".mlp.groups.text.gate.weight", transpose=True),
    Rule(_L + ".mlp.gate.weight_1", _L + ".mlp.groups.vision.gate.weight", transpose=True),
    TEXT[4],
    Rule("model.vision_model.{rest}", "model.vision_tower.{rest}"),
    Rule("vision_model.{rest}", "model.vision_tower.{rest}", export=False),
    *(
        Rule(f"{_RS}{m}_linear.{i}.{{rest}}", f"{_RS}{m}_linear.{name}.{{rest}}")
        for m in ("spatial", "temporal")
        for i, name in ((0, "fc1"), (2, "fc2"), (3, "ln"))
    ),
    Rule(_HL + ".gate.weight", _G + ".gate.weight", export=False),
    Rule(
        _HL + ".gate.moe_statics.e_score_correction_bias",
        _G + ".gate.e_score_correction_bias",
        part="row",
        export=False,
    ),
    Rule(_HL + ".experts.gate_up_proj", _G + ".gate_up_proj", export=False),
    Rule(_HL + ".experts.down_proj", _G + ".down_proj", export=False),
    Rule("model.language_model.{rest}", "model.{rest}", export=False),
    Rule("{rest}", "{rest}"),
)

# Which table reads a checkpoint, by the model_type of its config.json.
RULES_BY_MODEL_TYPE: dict[str, tuple[Rule, ...]] = {
    "ernie45": IDENTITY,
    "ernie4_5": TEXT,
    "ernie4_5_moe": TEXT,
    "ernie4_5_vl_moe": VL,
    "ernie4_5_moe_vl": VL,
}

# Checkpoint keys that are recognised but are not part of the next-token model.
SIDE_KEYS = re.compile(r"(^|\.)mtp_")
