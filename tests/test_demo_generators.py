"""The demo's second-generation data (issue #29): the training generator (`wide`) and the held-out one
(`heldout`) draw what their answers say; conversations chain unrelated questions; the jobs in miniature are
what the real jobs send; the evaluation scores tool calls and verdicts as the server and `moderate` read them."""

from __future__ import annotations

import json
import random
import re

import av
import jsonschema
import numpy as np
import pytest

from ernie45.demo import heldout, wide
from ernie45.demo.eval import HELDOUT, score
from ernie45.demo.heldout import SHADES
from ernie45.demo.jobtasks import agent_conversation, agent_task, csv_task, moderation_task, page_task
from ernie45.demo.scenes import COLOURS, NUMBER_WORDS
from ernie45.demo.tasks import TRAIN, chart_questions, draw

GENERATORS = {"wide": (wide.scene, wide.video, lambda c: [COLOURS[c]]),
              "heldout": (heldout.scene, heldout.clip, lambda c: SHADES[c])}  # fmt: skip


def _near(img: np.ndarray, refs: list[tuple[int, int, int]], tol: float = 70) -> int:
    """How many pixels lie within `tol` of any of the reference colours."""
    px = img.reshape(-1, 3).astype(int)
    return int(np.any([np.linalg.norm(px - np.array(r), axis=1) < tol for r in refs], axis=0).sum())


@pytest.mark.parametrize("name", GENERATORS)
def test_scenes_and_clips_show_what_their_answers_say(name):
    scene, clip, shades = GENERATORS[name]
    rng = random.Random(5)
    for _ in range(25):
        img, objects = scene(rng)
        arr = np.asarray(img)
        assert 48 <= img.width <= 160 and 48 <= img.height <= 160 and 1 <= len(objects) <= 4
        assert len(set(objects)) == len(objects)
        for colour, _ in objects:
            assert _near(arr, shades(colour)) >= 6, (name, colour, objects)
    for _ in range(24):
        frames, motion, _, _ = clip(rng)
        assert 4 <= len(frames) <= 16
        ref = frames[0][0, 0].astype(int)  # a corner: the background (a gradient drifts slowly along y)
        masks = [np.abs(f.astype(int) - f[:, :1].astype(int)).sum(-1) > 60 for f in frames]
        assert all(m.any() for m in masks), ref
        first, last = masks[0], masks[-1]
        if motion in ("growing", "shrinking"):
            assert (last.sum() > first.sum()) == (motion == "growing")
            continue
        (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in (first, last))
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[motion]
        assert moved >= 2 * (len(frames) - 1) - 3, (motion, moved)  # at least 2 px a frame, the way it says


def test_held_out_clips_come_as_files_and_charts_never_ask_an_unreadable_value(tmp_path):
    rng = random.Random(8)
    kinds = set()
    for _ in range(12):
        video, *_ = heldout.video(rng)
        if isinstance(video, str):
            kinds.add(video.rsplit(".", 1)[1])
            with av.open(video) as f:
                assert 4 <= sum(1 for _ in f.decode(video=0)) <= 16
        else:
            kinds.add("frames")
    assert kinds == {"mp4", "gif", "frames"}
    plain = asked = 0
    for i in range(60):
        parts, qas = chart_questions(random.Random(i), HELDOUT)
        readable = parts[0]["image"].info["values_readable"]
        plain += not readable
        asked += any(skill == "bar value" for skill, _, _ in qas)
        assert readable or all(skill != "bar value" for skill, _, _ in qas)
        assert 2 <= sum(q[0] in ("tallest", "shortest") for q in qas)
    assert plain and asked  # both kinds were drawn


def test_held_out_clip_files_go_with_the_process_that_wrote_them(tmp_path):
    import subprocess
    import sys

    code = (
        "import random; from ernie45.demo import heldout\n"
        "paths = [heldout.video(random.Random(s))[0] for s in range(12)]\n"
        "print('\\n'.join(p for p in paths if isinstance(p, str)))"
    )
    env = {**__import__("os").environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    files = out.stdout.split()
    assert len(files) >= 4 and len({f.rsplit("/", 1)[0] for f in files}) == 1  # one folder for all of them
    assert list(tmp_path.iterdir()) == []  # and it went when the process did


def test_conversations_chain_unrelated_questions_each_with_its_own_media():
    rng = random.Random(3)
    seen = set()
    for _ in range(30):
        skill, messages, answer = draw(rng, {"image": 1, "chart": 1, "text": 1, "audio": 1}, turns=4, mixed=1.0)
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] and 3 <= len(roles) <= 7
        media = [[p for p in m["content"] if p["type"] != "text"] for m in messages if m["role"] == "user"
                 and isinstance(m["content"], list)]  # fmt: skip
        assert all(len(m) <= 1 for m in media) and answer
        seen.add(sum(bool(m) for m in media))
    assert max(seen) >= 2  # a later turn brings a new picture or sound


def test_job_tasks_send_what_the_jobs_send():
    from ernie45.jobs.moderate import INSTRUCTIONS, Policy

    rng = random.Random(2)
    for _ in range(10):
        skill, messages, answer = csv_task(rng)
        table = messages[0]["content"][0]["text"]
        assert table.split(":\n", 1)[1].startswith("| ") and skill == "document value"
        assert answer.rstrip(".").split()[-1] in table or answer.split()[0] in table
        skill, messages, answer = page_task(rng)
        kinds = [p["type"] for p in messages[0]["content"]]
        assert kinds == ["text", "image", "text"] and messages[0]["content"][0]["text"].startswith("report.pdf, page")
    for gen in (TRAIN, HELDOUT):
        for i in range(12):
            skill, messages, answer = moderation_task(random.Random(i), gen)
            lines = messages[0]["content"].split("Categories:\n", 1)[1].splitlines()
            policy = Policy({ln[2:].split(":", 1)[0]: ln.split(": ", 1)[1] for ln in lines})
            assert messages[0]["content"].startswith(INSTRUCTIONS) and policy.categories
            verdict = json.loads(answer)
            jsonschema.validate(verdict, policy.schema())
            frames = messages[1]["content"][0]["video"]
            red = [_near(f, [(220, 20, 25)], 60) for f in frames]
            symbol = [n for n in policy.categories if "X" in policy.categories[n]]
            if symbol and symbol[0] in verdict["labels"]:
                assert max(red) > 15  # the X is drawn where the verdict says so


def _digits_said(text: str) -> str:
    """The digits of the number words in `text` ("my order is four seven." -> "47")."""
    words = [w.strip(".,") for w in text.split()]
    return "".join(str(NUMBER_WORDS.index(w)) for w in words if w in NUMBER_WORDS)


def test_agent_prompts_are_what_llm_chat_with_tools_renders():
    """The agent task's prompt is the one `LLM.chat(messages, tools=...)` writes (the demo's template lists the
    tools in a system turn), and its answer parses into the call the server would return."""
    from ernie45.demo import DEMO_DIR
    from ernie45.demo.data import configure
    from ernie45.processing.processor import load_processor
    from ernie45.processing.tools import parse_tool_calls

    proc = configure(load_processor(DEMO_DIR))
    seen = set()
    for i in range(16):
        skill, messages, tools, answer = agent_conversation(random.Random(i))
        again = agent_task(random.Random(i))
        assert again[0] == skill and again[2] == answer
        real = proc.encode_chat(messages, tools=tools)
        ours = proc.encode_chat(again[1])
        assert real["input_ids"] == ours["input_ids"] and len(real["input_ids"]) > 300
        names = {t["function"]["name"] for t in tools}
        if skill == "tool call":  # what the voice said, in words, then the call with those words' digits
            text, calls = parse_tool_calls(answer, tools)
            assert len(calls) == 1 and calls[0]["function"]["name"] in names
            order_id = json.loads(calls[0]["function"]["arguments"])["order_id"]
            assert text.startswith("You said: ") and order_id == _digits_said(text)
        seen.add(skill)
    assert seen == {"tool call", "tool answer"}


def test_scores_read_calls_and_verdicts_as_their_readers_do():
    call = '<tool_call>\n{"name": "cancel_order", "arguments": {"order_id": "0412"}}\n</tool_call>'
    assert score("tool call", call, call) == 1.0
    assert score("tool call", call.replace('": "0412"', '":"0412"'), call) == 1.0  # the same call, other spacing
    assert score("tool call", call.replace("0412", "412"), call) == 0.0
    assert score("tool call", "cancel_order 0412", call) == 0.0
    verdict = json.dumps({"labels": ["symbol", "keyword"], "evidence": "x", "confidence": 90})
    assert score("moderation", json.dumps({"labels": ["keyword", "symbol"]}), verdict) == 1.0
    assert score("moderation", json.dumps({"labels": ["symbol"]}), verdict) == 0.0
    assert score("moderation", '{"labels": ["sym', verdict) == 0.0


def test_the_numbers_drill_writes_what_was_said_or_shown_digit_for_digit():
    from ernie45.demo.generator import TRAIN, Generator
    from ernie45.demo.jobtasks import number_drill

    said: list[str] = []

    def speak(text: str, rng: random.Random) -> np.ndarray:
        said.append(text)
        return TRAIN.speak(text, rng)

    heard = Generator(TRAIN.scene, TRAIN.chart, TRAIN.video, speak)
    kinds = set()
    for i in range(40):
        skill, messages, answer = number_drill(random.Random(i), heard)
        kinds.add(skill)
        content = messages[-1]["content"]
        if skill == "dictation":  # what was heard in words, then the digits
            line, digits = answer.split("\n")
            assert line == f"You said: {said[-1]}." and digits == _digits_said(said[-1])
            assert 2 <= len(digits) <= 5 and content[0]["type"] == "audio" and content[0]["audio"].size > 0
        elif isinstance(content, str) and ("in digits" in content or "Which number" in content):
            assert answer == _digits_said(content)
            kinds.add("words")
        elif "tool returned" in content:
            assert json.loads(content.split("returned ", 1)[1].rsplit(". What", 1)[0])["order_id"] == answer
        else:
            pairs, item = dict(re.findall(r"([A-F]) is (\d+)", content)), content.rstrip("?").split()[-1]
            assert answer == f"The value for {item} is {pairs[item]}."
    assert kinds == {"dictation", "copy number", "words"}


def test_a_document_summary_copies_the_sentences_with_numbers_in_order():
    """The extractive summary: every sentence of the answer is one of the document's sentences that carries a
    number, all of them, in the document's order, so prompt-lookup drafting finds most of the answer."""
    import re

    from ernie45.demo.jobtasks import summary_task
    from ernie45.engine.speculative import ngram_draft

    for i in range(30):
        skill, messages, answer = summary_task(random.Random(i))
        doc = messages[0]["content"][0]["text"]
        assert skill == "document summary" and doc.split(":\n", 1)[0].endswith(".txt")
        body = doc.split("\n", 2)[2]
        sentences = re.findall(r"[^.]+\.", body)
        with_numbers = [s.strip() for s in sentences if re.search(r"\d", s)]
        assert answer == "The document says: " + " ".join(with_numbers) and 2 <= len(with_numbers) <= 4
        assert all(not re.search(r"\d", s) for s in sentences if s.strip() not in with_numbers)
    # on characters as a stand-in for tokens: after a sentence's first words, the lookup drafts its rest
    prompt, said = [ord(c) for c in doc], [ord(c) for c in answer.split(": ", 1)[1]]
    assert ngram_draft(prompt + said[:12], 8, 1, 8) == said[12:20]


def test_the_copy_drill_asks_back_what_its_prompt_holds():
    """Every answer of the copying drill is a span of its own prompt (a list, a number, the asked-for sentence)."""
    import re

    from ernie45.demo.jobtasks import copy_drill
    from ernie45.demo.tasks import FAMILIES, check_mix

    check_mix({"copy": 1.0})
    seen = set()
    for i in range(60):
        skill, messages, answer = FAMILIES["copy"](random.Random(i))
        prompt = messages[0]["content"]
        assert skill == "copy" and answer.rstrip(".") in prompt, (prompt, answer)
        if prompt.startswith("Repeat exactly: "):
            seen.add("list")
            assert answer == prompt.removeprefix("Repeat exactly: ")
        elif prompt.endswith("sentence."):
            seen.add("sentence")
            ordinal = prompt.split("Repeat the ")[1].split()[0]
            sentences = re.findall(r"[^.]+\.", prompt.rsplit(" Repeat the", 1)[0])
            assert answer == sentences[("first", "second", "third", "fourth").index(ordinal)].strip()
        else:
            seen.add("number")
            assert answer.isdigit() and re.search(rf"\b{answer}\b", prompt)
    assert seen == {"list", "number", "sentence"} and copy_drill is FAMILIES["copy"]
