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
from .generator import TRAIN, Generator
from .scenes import NUMBER_WORDS

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


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
SUBJECTS = ("sales", "orders", "returns", "visits", "sign-ups", "support tickets", "refunds", "deliveries")
FACTS = ("{S} rose to {n} in {m}.", "{S} fell to {n} in {m}.", "In {m}, {s} reached {n}.",
         "The team counted {n} {s} in {m}.", "{S} stayed at {n} through {m}.")  # fmt: skip
FILLER = ("The figures are rounded.", "This note was written by the office.", "See the appendix for details.",
          "All numbers are preliminary.", "The next review is planned.", "Questions go to the team lead.",
          "Weekends are included.", "The method did not change.")  # fmt: skip
SUMMARISE = ("Summarize the document.", "Summarise this document.", "Give a short summary of the document.",
             "What does the document say?")  # fmt: skip


def _fact(rng: random.Random, subject: str) -> str:
    """One sentence of a report, with a number in it: "Refunds fell to 4627 in March." """
    return rng.choice(FACTS).format(S=subject.capitalize(), s=subject, n=rng.randint(10, 9999), m=rng.choice(MONTHS))


def summary_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A short report as a text file and "Summarize the document.": its sentences that carry a number, word for
    word and in order, after "The document says:" (an extractive summary; the answer copies the prompt, as a
    summary of a long document mostly does, which is what prompt-lookup drafting speeds up)."""
    subjects = rng.sample(SUBJECTS, 2)
    facts = [_fact(rng, s) for s in rng.choices(subjects, k=rng.randint(2, 4))]
    lines = [*facts, *rng.sample(FILLER, rng.randint(2, 4))]
    order = sorted(range(len(lines)), key=lambda _: rng.random())
    text = " ".join(lines[i] for i in order)
    title = rng.choice(["Monthly note", "Team update", "Status report", "Review"])
    name = rng.choice(["notes.txt", "update.txt", "report.txt"])
    parts = document_parts(f"{title}\n{text}\n".encode(), name=name)
    said = " ".join(lines[i] for i in order if i < len(facts))
    question = {"type": "text", "text": rng.choice(SUMMARISE)}
    return "document summary", [{"role": "user", "content": [*parts, question]}], f"The document says: {said}"


JOB_TASKS = {"csv": csv_task, "page": page_task, "moderation": moderation_task}


TOOLS = {
    "get_order_status": ("Look up where an order is", {"order_id": "string"}),
    "cancel_order": ("Cancel an order", {"order_id": "string"}),
    "report_problem": ("Report an error a customer sees with an order", {"order_id": "string"}),
    "get_weather": ("Today's weather in a city", {"city": "string"}),
    "send_email": ("Send an email", {"to": "string", "body": "string"}),
}
RESULTS = {
    "get_order_status": lambda rng, o: ({"order_id": o, "status": (s := rng.choice(["shipped", "delivered",
                                                                                        "packed", "delayed"]))},
                                        f"Order {o} is {s}."),
    "cancel_order": lambda rng, o: ({"order_id": o, "cancelled": True}, f"Order {o} is cancelled."),
    "report_problem": lambda rng, o: ({"ticket": (t := f"T-{rng.randint(10, 99)}")},
                                      f"I opened ticket {t} for order {o}."),
}  # fmt: skip


def tool(name: str) -> dict:
    description, params = TOOLS[name]
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in params.items()},
                "required": list(params),
            },
        },
    }


def screenshot(rng: random.Random, kind: str) -> Image.Image:
    """A drawn screenshot: an order page (a coloured header bar over rows of a table) or an error dialog (a
    box with a red title bar and a warning sign over a greyed page)."""
    w, h = rng.randint(100, 160), rng.randint(80, 130)
    img = Image.new("RGB", (w, h), (250, 250, 250) if kind == "order" else (150, 150, 150))
    d = ImageDraw.Draw(img)
    if kind == "order":
        d.rectangle([0, 0, w, h // 6], fill=rng.choice([(40, 90, 200), (30, 140, 90), (90, 60, 160)]))
        for y in range(h // 4, h - 8, rng.randint(10, 14)):
            d.line([6, y, w - 6, y], fill=(190, 190, 190))
            d.rectangle([8, y + 3, 8 + rng.randint(15, w // 2), y + 6], fill=(90, 90, 90))
        return img
    x0, y0 = rng.randint(8, w // 5), rng.randint(8, h // 5)
    x1, y1 = w - rng.randint(8, w // 5), h - rng.randint(8, h // 5)
    d.rectangle([x0, y0, x1, y1], fill=(255, 255, 255), outline=(60, 60, 60))
    d.rectangle([x0, y0, x1, y0 + (y1 - y0) // 5], fill=(200, 30, 30))
    cx, cy, r = x0 + (x1 - x0) // 4, (y0 + y1) // 2 + 4, min(x1 - x0, y1 - y0) // 6
    d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=(240, 190, 0))
    d.rectangle([cx + r + 6, cy - 2, x1 - 8, cy + 2], fill=(90, 90, 90))
    return img


def agent_conversation(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], list[dict], str]:
    """(skill, OpenAI messages, tools, answer): a customer's screenshot and voice message with an order number,
    3-4 tools offered, the right one to call with the spoken number — then, half the time, the tool's result to
    answer from."""
    from ..processing.tools import _block

    page = rng.choice(["order", "error"])
    order = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 4)))
    spoken = " ".join(NUMBER_WORDS[int(c)] for c in order)
    if rng.random() < 0.3:
        said, name = f"please cancel order {spoken}", "cancel_order"
    else:
        said = rng.choice([f"order {spoken}", f"this is about order {spoken}", f"my order is {spoken}"])
        name = "report_problem" if page == "error" else "get_order_status"
    offered = [name, *rng.sample([t for t in TOOLS if t != name], rng.randint(2, 3))]
    rng.shuffle(offered)
    ask = rng.choice(["Help me with this.", "Can you help?", "Please help."])
    media = [
        {"type": "image", "image": screenshot(rng, page)},
        {"type": "audio", "audio": (gen or TRAIN).speak(said, rng)},
    ]
    messages = [{"role": "user", "content": [*media, {"type": "text", "text": ask}]}]
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps({"order_id": order})}}
    heard = heard_line(said)  # the message in words first: the digits are then written from text the model wrote
    if rng.random() < 0.5:
        result, answer = RESULTS[name](rng, order)
        messages += [{"role": "assistant", "content": heard, "tool_calls": [{"id": "call_1", **call}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)}]  # fmt: skip
        return "tool answer", messages, [tool(t) for t in offered], answer
    return "tool call", messages, [tool(t) for t in offered], f"{heard}\n{_block(call)}"


def heard_line(said: str) -> str:
    """What a voice message said, in words, before the answer that uses it: from sound to digits is two steps
    (sound to words, words to digits), as a sum was columns, and the demo model transcribed spoken digits as
    words far more often than it wrote them as digits (the numbers: the model card, stage 25)."""
    return f"You said: {said}."


def agent_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """The agent conversation with its tools written into the prompt, as `LLM.chat(..., tools=...)` writes them."""
    from ..processing.tools import prepare_messages

    skill, messages, tools, answer = agent_conversation(rng, gen)
    return skill, prepare_messages(messages, tools, "")[0], answer


JOB_TASKS["agent"] = agent_task
JOB_TASKS["summary"] = summary_task  # (last: the families before it keep their evaluation seeds)


def number_drill(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A training-only drill on numbers kept in order, the step every job above hangs on: the agent writes a
    spoken order number as digits ("four seven one one" -> "4711"), and the document and tool answers copy a
    number from text. The second generation picked the right tool but wrote the spoken digits as a bag ("848" ->
    "488") and slipped digits copying a tool's result."""
    order = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5)))
    spoken = " ".join(NUMBER_WORDS[int(c)] for c in order)
    kind = rng.choice(["spoken", "spoken", "words", "result", "table"])
    if kind == "spoken":
        said = rng.choice([f"order {spoken}", f"my order is {spoken}", spoken, f"the number is {spoken}"])
        audio = {"type": "audio", "audio": (gen or TRAIN).speak(said, rng)}
        ask = rng.choice(["Write the number in digits.", "Which order number was said?", "What number is said?"])
        messages = [{"role": "user", "content": [audio, {"type": "text", "text": ask}]}]
        return "dictation", messages, f"{heard_line(said)}\n{order}"
    if kind == "words":  # the second of dictation's two steps, alone
        text = rng.choice([f"Write {spoken} in digits.", f"My order is {spoken}. Which number is that?"])
        return "copy number", [{"role": "user", "content": text}], order
    if kind == "result":
        name = rng.choice(list(RESULTS))
        result, _ = RESULTS[name](rng, order)
        text = f"The tool returned {json.dumps({'order_id': order, **result})}. What is the order number?"
        return "copy number", [{"role": "user", "content": text}], order
    items = sorted(rng.sample(ITEMS, rng.randint(2, 5)))
    values = {k: rng.randint(1, 9999) for k in items}
    item = rng.choice(items)
    text = ", ".join(f"{k} is {v}" for k, v in values.items()) + f". What is the value for {item}?"
    return "copy number", [{"role": "user", "content": text}], f"The value for {item} is {values[item]}."


COPY_WORDS = ("red", "blue", "green", "star", "circle", "square", "apple", "river", "paper", "window", "north",
              "seven", "order", "table", "March", "Monday")  # fmt: skip


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 3)))


def copy_drill(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    """A training-only drill on copying from the context, the step under every job's answer (a summary's
    sentences, an order number, a table's value, a tool's result): a list, a number or one sentence of a short
    text asked back word for word. Made-up words (random syllables, cut into tokens no answer has seen) can only
    be copied by finding each token's place in the prompt and taking the one after it, the mechanism copying needs
    (`induction.copy_score` measures it)."""
    kind = rng.choice(["list", "made-up", "made-up", "number", "sentence"])
    if kind in ("list", "made-up"):
        n = rng.randint(3, 12)
        items = (", ".join(rng.choice(COPY_WORDS) for _ in range(n)) if kind == "list"
                 else " ".join(_made_up_word(rng) for _ in range(n)))  # fmt: skip
        return "copy", [{"role": "user", "content": f"Repeat exactly: {items}."}], f"{items}."
    if kind == "number":
        number = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 12)))
        ask = rng.choice([f"Repeat the number {number}.", f"The code is {number}. What is the code?"])
        return "copy", [{"role": "user", "content": ask}], number
    sentences = [_fact(rng, s) for s in rng.sample(SUBJECTS, rng.randint(2, 4))]
    which = rng.randrange(len(sentences))
    ordinal = ("first", "second", "third", "fourth")[which]
    text = " ".join(sentences) + f" Repeat the {ordinal} sentence."
    return "copy", [{"role": "user", "content": text}], sentences[which]
