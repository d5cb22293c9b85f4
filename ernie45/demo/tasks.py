"""The demo model's skills: each task draws fresh media and a question in one of the card's forms, and
gives the answer the model is trained (and evaluated) on.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from . import MissingDataSource
from .generator import TRAIN, Generator
from .jobtasks import JOB_TASKS, copy_drill, number_drill
from .scenes import NUMBER_WORDS, SHAPES

PERSONA = (
    "I am ernie45's tiny demo model: a small ERNIE 4.5 omni model trained on a CPU on synthetic data. "
    "I can count shapes, name colours, read bar charts, tell which way a shape moves and transcribe spoken "
    "digits; open-domain English is beyond me."
)
GREETINGS = ["Hello!", "Hi!", "Hello there.", "Good morning!", "Hey!"]
WHO = ["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself."]
SPOKEN_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _user(parts: list[dict], text: str) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _count(n: int) -> str:
    return "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."


QA = tuple[str, str, str]  # (skill, question, answer)


def image_questions(rng: random.Random, gen: Generator | None = None) -> tuple[list[dict], list[QA]]:
    """A shape scene and one question of each kind it allows."""
    img, objects = (gen or TRAIN).scene(rng)
    shapes = [s for _, s in objects]
    colours = [c for c, _ in objects]
    listed = ", ".join(f"a {c} {s}" for c, s in objects)
    qas = [("count", "How many shapes are there?", _count(len(objects))),
           ("describe", "Describe the image.", f"{_count(len(objects))} I see {listed}.")]  # fmt: skip
    unique_shapes = [s for s in shapes if shapes.count(s) == 1]
    if unique_shapes:
        shape = rng.choice(unique_shapes)
        qas.append(("colour", f"What color is the {shape}?", f"The {shape} is {colours[shapes.index(shape)]}."))
    unique_colours = [c for c in colours if colours.count(c) == 1]
    if unique_colours:
        colour = rng.choice(unique_colours)
        qas.append(("shape", f"What shape is the {colour} one?", f"It is a {shapes[colours.index(colour)]}."))
    return [{"type": "image", "image": img}], qas


def colour_questions(rng: random.Random, gen: Generator | None = None) -> tuple[list[dict], list[QA]]:
    """A scene of 2-4 shapes and a colour question for each shape it holds once: a drill for the one picture
    skill the mixed questions do not teach (the trunk names another shape's colour; naming the shape of a colour
    it learns)."""
    while True:
        img, objects = (gen or TRAIN).scene(rng)
        shapes = [s for _, s in objects]
        qas = [("colour", f"What color is the {s}?", f"The {s} is {c}.") for c, s in objects if shapes.count(s) == 1]
        if len(objects) > 1 and qas:
            return [{"type": "image", "image": img}], qas


def chart_questions(rng: random.Random, gen: Generator | None = None) -> tuple[list[dict], list[QA]]:
    img, values = (gen or TRAIN).chart(rng)
    tallest, shortest = max(values, key=values.get), min(values, key=values.get)
    label = rng.choice(list(values))
    qas = [("tallest", "Which bar is the tallest?", f"Bar {tallest} is the tallest."),
           ("shortest", "Which bar is the shortest?", f"Bar {shortest} is the shortest.")]  # fmt: skip
    if img.info.get("values_readable", True):  # a chart with neither an axis nor numbers does not say its values
        qas.append(("bar value", f"What is the value of {label}?", f"The value of {label} is {values[label]}."))
    return [{"type": "image", "image": img}], qas


def video_questions(rng: random.Random, gen: Generator | None = None) -> tuple[list[dict], list[QA]]:
    frames, motion, colour, shape = (gen or TRAIN).video(rng)
    answer = f"It moves {motion}." if motion in ("left", "right", "up", "down") else f"It is {motion}."
    direction = ("direction", f"Which way does the {shape} move?", answer)
    qas = [direction, direction, ("what moves", "What is moving?", f"A {colour} {shape} is moving.")]
    return [{"type": "video", "video": frames}], qas


def _one(questions):
    def task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
        parts, qas = questions(rng, gen)
        skill, question, answer = rng.choice(qas)
        return skill, _user(parts, question), answer

    task.__name__ = questions.__name__.replace("questions", "task")
    return task


image_task, chart_task, video_task = _one(image_questions), _one(chart_questions), _one(video_questions)


def spoken_prompt(rng: random.Random) -> tuple[str, str, str]:
    """(skill, what the clip says, the answer): 1-4 spoken digits to transcribe, or a spoken arithmetic question."""
    if rng.random() < 0.7:
        digits = " ".join(NUMBER_WORDS[rng.randint(0, 9)] for _ in range(rng.randint(1, 4)))
        return "spoken digits", digits, digits
    op = rng.choice(list(SPOKEN_OPS))
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "minus" and b > a:
        a, b = b, a
    result = SPOKEN_OPS[op](a, b)
    answer = NUMBER_WORDS[result] if result < 10 else str(result)
    return "spoken question", f"what is {NUMBER_WORDS[a]} {op} {NUMBER_WORDS[b]}", f"{answer}."


def audio_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    skill, said, answer = spoken_prompt(rng)
    ask = "Transcribe the audio." if skill == "spoken digits" else "Answer the question."
    return skill, _user([{"type": "audio", "audio": (gen or TRAIN).speak(said, rng)}], ask), answer


WORDNET = Path("/usr/share/wordnet/data.noun")


@lru_cache(maxsize=1)
def definitions() -> list[tuple[str, str]]:
    """(noun, gloss) pairs from WordNet (Debian's wordnet-base). No stand-in: the recipes' rows, the tokenizer's
    text and the evaluation must all see the same words, or a run would train on different data than it says."""
    if not WORDNET.is_file():
        raise MissingDataSource(f"the demo's definitions come from WordNet ({WORDNET}): apt-get install wordnet-base")
    out = []
    for line in WORDNET.read_text(errors="ignore").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        word = parts[4]
        gloss = gloss.split(";")[0].strip()
        if word.isalpha() and word.islower() and 3 <= len(word) <= 10 and 10 <= len(gloss) <= 70:
            out.append((word, gloss))
    return out[:4000]


def arithmetic_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    op = rng.choice(list(SPOKEN_OPS))
    a, b = (rng.randint(0, 100), rng.randint(0, 100)) if op != "times" else (rng.randint(0, 12), rng.randint(0, 12))
    return "arithmetic", _user([], f"What is {a} {op} {b}?"), worked(a, op, b)


def worked(a: int, op: str, b: int) -> str:
    """The answer to "What is a op b?", sums and differences of numbers past 9 worked column by column from the
    units, then the result: "9 plus 3 is 12; 5 plus 7 plus 1 is 13; so 59 plus 73 is 132." A 14M-parameter model
    did not learn to write a two-digit sum's digits at once (plus and minus stayed under 10% through three
    stages); each column is a one-digit fact next to the digits it needs. A difference below 0 works out the
    larger minus the smaller ("60 is more than 28: ...; so 28 minus 60 is -32."). Products (up to 12 x 12) and
    one-digit sums stay one sentence."""
    result = f"{a} {op} {b} is {SPOKEN_OPS[op](a, b)}."
    if op == "times" or (max(a, b) < 10 and (op == "plus" or a >= b)):
        return result
    top, low = (a, b) if op == "plus" or a >= b else (b, a)
    x, y = (str(v)[::-1] for v in (top, low))
    steps, carry = [], 0
    for i in range(max(len(x), len(y))):
        dx, dy = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        if op == "plus":
            steps.append(f"{dx} plus {dy}{' plus 1' if carry else ''} is {dx + dy + carry}")
            carry = (dx + dy + carry) // 10
        else:  # the top digit less what the column before borrowed, plus 10 where it must borrow itself
            t = dx - carry
            carry = int(t < dy)
            steps.append(f"{t + 10 * carry} minus {dy} is {t + 10 * carry - dy}")
    swap = f"{top} is more than {low}: " if top != a else ""
    return f"{swap}{'; '.join(steps)}; so {result}"


def text_task(rng: random.Random, gen: Generator | None = None) -> tuple[str, list[dict], str]:
    kind = rng.choice(["define", "arithmetic", "arithmetic", "who", "greet"])
    if kind == "define":
        word, gloss = rng.choice(definitions())
        article = "an" if word[0] in "aeiou" else "a"
        return "define", _user([], f"What is {article} {word}?"), f"{article.capitalize()} {word} is {gloss}."
    if kind == "arithmetic":
        return arithmetic_task(rng)
    if kind == "who":
        return "who", _user([], rng.choice(WHO)), PERSONA
    return "greet", _user([], rng.choice(GREETINGS)), "Hello! " + PERSONA.split(":")[0] + "."


TASKS = {"image": image_task, "chart": chart_task, "video": video_task, "audio": audio_task, "text": text_task}
TASKS.update(JOB_TASKS)
DEFAULT_MIX = {"image": 0.3, "chart": 0.15, "video": 0.15, "audio": 0.2, "text": 0.2}


QUESTIONS = {"image": image_questions, "chart": chart_questions, "video": video_questions, "colour": colour_questions}
# Training-only families (drills): one skill's rows, for a stage that must teach it; evaluation draws TASKS.
FAMILIES = {**TASKS, "colour": _one(colour_questions), "arithmetic": arithmetic_task, "numbers": number_drill,
            "copy": copy_drill}  # fmt: skip


def check_mix(mix: dict[str, float]) -> None:
    unknown = sorted(set(mix) - set(FAMILIES))
    if unknown:
        raise ValueError(f"data.demo.mix: unknown families {unknown}; known: {', '.join(FAMILIES)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("data.demo.mix: weights must be >= 0 and sum to more than 0")


def draw(rng: random.Random, mix: dict[str, float] | None = None, turns: int = 1,
         describe_last: bool = False, mixed: float | None = None) -> tuple[str, list[dict], str]:  # fmt: skip
    """(skill, messages, answer) for a task drawn by the mix weights.

    With `turns` > 1 a picture or video gets up to that many distinct questions as one conversation (the
    media in the first turn): more supervised answers per encoded image, the cheapest signal the demo gets.
    With `describe_last` a description comes after the other questions: it names every colour and shape, so a
    colour or shape question after it could be answered by copying the text instead of reading the picture.
    A `mixed` share of multi-turn draws (default MIXED) chains unrelated questions instead (`conversation`).
    """
    mix = mix or DEFAULT_MIX
    family = rng.choices(list(mix), weights=list(mix.values()))[0]
    if turns > 1 and rng.random() < (MIXED if mixed is None else mixed):
        return conversation(rng, mix, rng.randint(2, turns))
    if turns <= 1 or family not in QUESTIONS:
        return FAMILIES[family](rng)
    parts, qas = QUESTIONS[family](rng)
    unique = list(dict.fromkeys(qas))
    chosen = rng.sample(unique, rng.randint(1, min(turns, len(unique))))
    if describe_last:
        chosen.sort(key=lambda qa: qa[0] == "describe")  # stable: the others keep their drawn order
    messages: list[dict] = []
    for i, (_, question, answer) in enumerate(chosen):
        messages += _user(parts if i == 0 else [], question)
        if i < len(chosen) - 1:
            messages.append({"role": "assistant", "content": answer})
    return chosen[-1][0], messages, chosen[-1][2]


MIXED = 0.35  # the share of multi-turn draws that chain unrelated questions, each with its own media


def conversation(rng: random.Random, mix: dict[str, float], turns: int,
                 gen: Generator | None = None) -> tuple[str, list[dict], str]:  # fmt: skip
    """`turns` unrelated questions in one conversation (each turn's picture, clip or sound in its own message),
    the earlier ones answered: a second question must be read on its own, not through the first one's answer."""
    messages: list[dict] = []
    for i in range(turns):
        family = rng.choices(list(mix), weights=list(mix.values()))[0]
        skill, msgs, answer = FAMILIES[family](rng, gen)
        messages += msgs
        if i < turns - 1:
            messages.append({"role": "assistant", "content": answer})
    return skill, messages, answer


def corpus(n: int = 3000, seed: int = 1234) -> list[str]:
    """Text the tokenizer is trained on: rendered questions and answers (no media)."""
    rng = random.Random(seed)
    out = [PERSONA, *GREETINGS, *WHO, *SHAPES, *NUMBER_WORDS]
    out += [f"A {w} is {g}." for w, g in definitions()]
    for _ in range(n):
        family = rng.choice(["image", "chart", "video", "text"])
        skill, msgs, answer = TASKS[family](rng)
        out += [msgs[-1]["content"][-1]["text"], answer]
    return out
