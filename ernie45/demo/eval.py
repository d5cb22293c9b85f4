"""`ernie45 eval-demo`: accuracy per skill on freshly generated, held-out samples (new seeds)."""

from __future__ import annotations

import random
import re

from ..engine import LLM, SamplingParams
from .tasks import TASKS

# The skill card's targets (issue #8): share of answers that must be right.
TARGETS = {
    "colour": 0.95, "direction": 0.95, "spoken digits": 0.95, "count": 0.85, "shape": 0.85, "tallest": 0.85,
    "shortest": 0.85, "bar value": 0.80, "arithmetic": 0.80,
}  # fmt: skip
HELD_OUT = 900_000_001  # training rows use seeds seed * 1_000_003 + i; evaluation starts far away


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def score(skill: str, got: str, expected: str) -> float:
    """1.0 for a right answer; for spoken digits the share of words right (1 - word error rate, floored at 0).
    Arithmetic is scored on its conclusion ("... so 59 plus 73 is 132." -> "59 plus 73 is 132.")."""
    if skill == "arithmetic":
        got, expected = got.rsplit("so ", 1)[-1], expected.rsplit("so ", 1)[-1]
    if skill != "spoken digits":
        return float(_norm(got) == _norm(expected))
    want, have = _norm(expected).split(), _norm(got).split()
    return max(0.0, 1.0 - _edit_distance(want, have) / max(len(want), 1))


def _edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def evaluate(llm: LLM, n: int = 50, seed: int = HELD_OUT, batch: int = 16) -> dict[str, tuple[float, int]]:
    """skill -> (accuracy, samples) over `n` fresh tasks of each family."""
    results: dict[str, list[float]] = {}
    greedy = SamplingParams(max_tokens=64, temperature=0)
    for f, task in enumerate(TASKS.values()):
        drawn = [task(random.Random(seed + 7919 * f + j)) for j in range(n)]
        for start in range(0, n, batch):
            chunk = drawn[start : start + batch]
            answers = llm.chat([msgs for _, msgs, _ in chunk], greedy)
            for (skill, _, expected), got in zip(chunk, answers, strict=True):
                results.setdefault(skill, []).append(score(skill, got.text, expected))
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(results.items())}


def report(results: dict[str, tuple[float, int]]) -> tuple[str, bool]:
    lines = [f"{'skill':16} {'accuracy':>9} {'target':>7} {'n':>5}"]
    ok = True
    for skill, (acc, n) in results.items():
        target = TARGETS.get(skill)
        mark = "" if target is None else ("  ok" if acc >= target else "  below")
        ok &= target is None or acc >= target
        lines.append(f"{skill:16} {acc:9.1%} {'' if target is None else f'{target:.0%}':>7} {n:5d}{mark}")
    return "\n".join(lines), ok
