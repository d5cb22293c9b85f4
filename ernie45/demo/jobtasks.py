"""Two of the product's jobs in miniature, as demo tasks (issue #29): questions about a document (a CSV given as
text; a report page whose table comes as its text layer and whose chart as a picture, exactly the parts
`processing.documents` makes of a PDF page) and moderation verdicts (a clip's frames and sound against a
policy, answered as the JSON the `moderate` job forces).
"""

from __future__ import annotations

import json
import random

import numpy as np
from PIL import Image, ImageDraw

from ..jobs.moderate import Policy
from ..processing.documents import document_parts
from .scenes import NUMBER_WORDS
from .tasks import TRAIN, Generator

QUARTERS = ("Q1", "Q2", "Q3", "Q4")
ITEMS = ("A", "B", "C", "D", "E", "F")
FLAGGED_WORD = "danger"
SYMBOL = {"symbol": "a red X mark is shown", "red_x": "a big red X appears", "banned_sign": "the red X sign"}
WORD = {"spoken_word": f"someone says the word {FLAGGED_WORD}", "danger_word": f"the word {FLAGGED_WORD} is said",
        "keyword": f"the keyword {FLAGGED_WORD} is spoken"}  # fmt: skip


def _table(rng: random.Random) -> tuple[bytes, dict[str, int]]:
    items = sorted(rng.sample(ITEMS, rng.randint(2, 5)))
    values = dict(zip(items, rng.sample(range(1, 100), len(items)), strict=True))
    head = rng.choice(["item,value", "name,value", "product,value"])
    return (head + "\n" + "\n".join(f"{k},{v}" for k, v in values.items()) + "\n").encode(), values


def _table_questions(values: dict[str, int], rng: random.Random) -> list[tuple[str, str, str]]:
    item = rng.choice(list(values))
    top, low = max(values, key=values.get), min(values, key=values.get)
    return [("document value", f"What is the value for {item}?", f"The value for {item} is {values[item]}."),
            ("document value", "Which item has the highest value?", f"{top} has the highest value."),
            ("document value", "Which item has the lowest value?", f"{low} has the lowest value.")]  # fmt: skip


def csv_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A CSV file as the documents pipeline gives it (a Markdown table in text) and a question about it."""
    data, values = _table(rng)
    parts = document_parts(data, name=rng.choice(["sales.csv", "data.csv", "table.csv"]))
    skill, question, answer = rng.choice(_table_questions(values, rng))
    return skill, [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}], answer


def page_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A report page: its text layer (a title and a small table) and its rendering (a quarterly bar chart)."""
    data, values = _table(rng)
    table = document_parts(data, name="t.csv")[0]["text"].split("\n", 1)[1]
    title = rng.choice(["Quarterly report", "Sales overview", "Results"])
    text = f"report.pdf, page {rng.randint(1, 9)}:\n{title}\n{table}"
    chart, quarters = (gen or TRAIN).chart(rng, labels=QUARTERS)
    top, low = max(quarters, key=quarters.get), min(quarters, key=quarters.get)
    qas = [("document chart", "Which quarter is the highest?", f"{top} is the highest."),
           ("document chart", "Which quarter is the lowest?", f"{low} is the lowest."),
           *_table_questions(values, rng)]  # fmt: skip
    skill, question, answer = rng.choice(qas)
    parts = [{"type": "text", "text": text}, {"type": "image", "image": chart}, {"type": "text", "text": question}]
    return skill, [{"role": "user", "content": parts}], answer


def draw_x(frame: np.ndarray, rng: random.Random) -> np.ndarray:
    """The policy's symbol: a thick red X somewhere on the frame."""
    img = Image.fromarray(frame)
    h, w = frame.shape[:2]
    r = min(w, h) * rng.uniform(0.2, 0.35)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    d = ImageDraw.Draw(img)
    for a, b in (((cx - r, cy - r), (cx + r, cy + r)), ((cx - r, cy + r), (cx + r, cy - r))):
        d.line([a, b], fill=(230, 20, 20), width=max(3, int(r / 3)))
    return np.asarray(img)


def moderation_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A 2-4 s window (frames and sound) against a one- or two-category policy; the verdict as JSON."""
    symbol_name, word_name = rng.choice(list(SYMBOL)), rng.choice(list(WORD))
    categories = {symbol_name: SYMBOL[symbol_name], word_name: WORD[word_name]}
    if rng.random() < 0.3:
        del categories[rng.choice([symbol_name, word_name])]
    if rng.random() < 0.5:
        categories = dict(reversed(categories.items()))
    policy = Policy(categories, rng.choice(["", "Flag a segment only when it clearly shows or says the category."]))
    g = gen or TRAIN
    frames = (g.clip or g.video)(rng)[0]
    shown, said = rng.random() < 0.45, rng.random() < 0.45
    if shown:
        first = rng.randrange(len(frames))
        frames = np.stack([(g.mark or draw_x)(f, rng) if t >= first else f for t, f in enumerate(frames)])
    words = [NUMBER_WORDS[rng.randint(0, 9)] for _ in range(rng.randint(1, 3))]
    if said:
        words.insert(rng.randint(0, len(words)), FLAGGED_WORD)
    audio = g.speak(" ".join(words), rng)
    start = rng.randint(0, 30) * 2.0
    length = rng.choice([2.0, 4.0])
    labels = [n for n in categories if (n == symbol_name and shown) or (n == word_name and said)]
    evidence = "; ".join(["a red X is shown" if n == symbol_name else f"the word {FLAGGED_WORD} is said"
                          for n in labels]) or "nothing from the policy"  # fmt: skip
    verdict = {"labels": labels, "evidence": evidence, "confidence": 90 if labels else 80}
    ask = f"Segment {start:.1f}-{start + length:.1f} s. Which categories apply?"  # as `moderate` asks
    parts = [{"type": "video", "video": frames}, {"type": "audio", "audio": audio}, {"type": "text", "text": ask}]
    messages = [{"role": "system", "content": policy.prompt()}, {"role": "user", "content": parts}]
    return "moderation", messages, json.dumps(verdict)


JOB_TASKS = {"csv": csv_task, "page": page_task, "moderation": moderation_task}
