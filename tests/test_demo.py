"""The demo model's data, tokenizer and recipe (a smoke training run), and the shipped model's skills."""

from __future__ import annotations

import logging
import random
import subprocess
import sys

import numpy as np
import pytest

import ernie45
from ernie45.demo import DEMO_DIR
from ernie45.demo.data import DemoRows, configure
from ernie45.demo.eval import score
from ernie45.demo.scenes import COLOURS, SHAPES, bar_chart, moving_video, shape_scene
from ernie45.demo.tasks import TASKS
from ernie45.demo.tokenizer import build_tokenizer
from ernie45.processing.processor import load_processor


def test_scenes_show_what_their_answers_say():
    rng = random.Random(0)
    for _ in range(20):
        img, objects = shape_scene(rng)
        pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
        assert all(COLOURS[c] in pixels for c, _ in objects) and 1 <= len(objects) <= 4
    chart, values = bar_chart(rng)
    assert len(set(values.values())) == len(values)  # no ties: tallest and shortest are well defined
    frames, motion, _, _ = moving_video(rng)
    assert frames.shape[0] == 8 and frames.dtype == np.uint8
    a, b = frames[0].astype(int), frames[-1].astype(int)
    assert np.abs(a - b).sum() > 0  # something moves


def test_demo_tokenizer_and_rows_are_deterministic(tmp_path):
    tok_dir = build_tokenizer(tmp_path / "tok")
    config = ernie45.presets.get("demo-omni")
    config.save_pretrained(tok_dir)
    proc = configure(ernie45.load_processor(tok_dir))
    assert proc.ids["image"] == config.image_token_id and proc.ids["audio"] == config.audio_token_id
    rows = DemoRows(proc, rows=4, budget=512, seed=3)
    again = DemoRows(proc, rows=4, budget=512, seed=3)
    assert [s.input_ids for s in rows[2]] == [s.input_ids for s in again[2]]
    assert sum(len(s) for s in rows[1]) <= 512
    skills = {TASKS[f](random.Random(i))[0] for f in TASKS for i in range(40)}
    assert {"count", "colour", "tallest", "direction", "spoken digits", "arithmetic", "who"} <= skills


def test_drill_families_ask_only_their_skill_and_a_bad_mix_is_refused(tmp_path):
    from ernie45.demo.tasks import check_mix, draw

    for i in range(30):
        skill, messages, answer = draw(random.Random(i), {"colour": 1.0}, turns=4, mixed=0.0)
        questions = [m["content"][-1]["text"] for m in messages if m["role"] == "user"]
        assert skill == "colour" and all(q.startswith("What color is the ") for q in questions)
        assert len(set(questions)) == len(questions)  # each turn asks about another shape
        image = messages[0]["content"][0]["image"]
        colour = answer.rstrip(".").split()[-1]  # drawn with up to 25 levels of drift per channel, maybe JPEG'd
        px = np.asarray(image).reshape(-1, 3).astype(int)
        assert (np.abs(px - np.array(COLOURS[colour])).max(-1) <= 45).sum() >= 6, colour
        skill, _, answer = draw(random.Random(i), {"arithmetic": 1.0})
        assert skill == "arithmetic" and " is " in answer
    with pytest.raises(ValueError, match="unknown families \\['colours'\\]"):
        check_mix({"colours": 1.0})
    with pytest.raises(ValueError, match="sum to more than 0"):
        check_mix({"colour": 0.0})


def test_chart_bars_and_scene_targets_follow_the_token_grid():
    """Bar k (label "ABCDE"[k]) is drawn inside the k-th fifth of the chart, which is token column k of the 5 x 5
    grid; the stage-0 targets put each bar's value in its column and each shape under its own tokens."""
    import torch

    from ernie45.demo.encoders import _column_targets, _scene_batch

    rng = random.Random(2)
    for _ in range(10):
        img, values = bar_chart(rng)
        blue = np.all(np.asarray(img) == (40, 70, 230), axis=-1)
        fifth = img.width / 5
        for k, v in enumerate(values.values()):
            slot = blue[:, int(k * fifth) + 1 : int((k + 1) * fifth)]
            height = slot.sum(0).max()
            assert abs(height - (img.height - 20) * v / 9) <= 1.5  # the bar in its own fifth, as tall as its value
        assert not blue[:, int(len(values) * fifth) + 1 :].any()  # no bar in the slots of absent labels
    targets = _column_targets(torch.tensor([[3, 5, 0, 0, 0]]), 5)[0].view(2, 5, 5)
    assert targets[0, :, 1].tolist() == [5] * 5 and targets[0, :, 2].tolist() == [0] * 5
    assert targets[1, 4].tolist() == [0, 1, -100, -100, -100]
    images, objects, under = _scene_batch(random.Random(3), 8, 5)
    for b in range(8):  # every shape and colour of the scene lies under at least one token, and nothing else does
        assert {int(s) for s in under[b, 0] if s} == {SHAPES.index(shape) + 1 for _, shape in objects[b]}
        assert {int(c) for c in under[b, 1] if c} == {list(COLOURS).index(colour) + 1 for colour, _ in objects[b]}
        assert len(images) == 8 and 1 <= len(objects[b]) <= 4


@pytest.mark.parametrize("generator", ["first", "wide"])
def test_encoder_stage_lowers_its_losses(generator):
    """Stage 0 of the recipe on a small model: its summed loss falls well below the untrained one's in 30 steps,
    on the first generation's media and on the second's (pictures at their own aspect ratio, 2-7 bar charts, the
    agent's voice messages)."""
    import torch

    from ernie45.demo import default_model_path
    from ernie45.demo.encoders import pretrain_encoders
    from ernie45.model import Ernie45ForConditionalGeneration

    config = ernie45.presets.get("demo-omni", num_hidden_layers=2, moe_layer_end_index=1)
    proc = configure(ernie45.load_processor(default_model_path()))
    losses = {}
    for steps in (1, 30):  # (at 30 steps the ratio was 0.55 on the first generation's media, 0.46 on the second's)
        torch.manual_seed(0)
        stats = pretrain_encoders(Ernie45ForConditionalGeneration(config), proc, steps=steps, batch=8, lr=2e-3,
                                  generator=generator)  # fmt: skip
        losses[steps] = stats["loss"]
    assert losses[30] < 0.85 * losses[1], losses
    per_token = {"bar tokens", "bar token values", "name tokens"} if generator == "wide" else set()  # free layout
    assert set(stats) == {"colour", "shape", "count", "bar value", "tallest", "shortest", "direction", "speech clips",
                          "loss", *per_token}  # fmt: skip


def test_free_layout_chart_token_targets_follow_what_was_drawn():
    """`wide.chart(layout=...)` says where it drew each bar and name: the bar's centre pixel has the bar's colour
    (not the background), and the per-token targets put each bar's label and value under its centre and each
    name in exactly one token."""
    from ernie45.demo import wide
    from ernie45.demo.encoders import _chart_token_targets

    for i in range(40):
        layout = {}
        img, values = wide.chart(random.Random(i), layout=layout)
        assert set(layout["bars"]) == set(values) == set(layout["names"])
        px = np.asarray(img).astype(int)
        corner = px[0, 0]
        rows, cols = 6 + i % 5, 9 - i % 4
        targets = _chart_token_targets(layout, values, (rows, cols)).view(3, rows, cols)
        centres = {label: ((x0 + x1) / 2, (y0 + y1) / 2) for label, (x0, y0, x1, y1) in layout["bars"].items()}
        cells = [(int(cy * rows), int(cx * cols)) for cx, cy in centres.values()]
        for label, (cx, cy) in centres.items():
            assert np.abs(px[int(cy * img.height), int(cx * img.width)] - corner).max() > 30, (i, label)
            r, c = int(cy * rows), int(cx * cols)
            k = 1 + wide.LABELS.index(label)
            if cells.count((r, c)) == 1:  # (two narrow bars' centres in one token: the later one has it)
                assert targets[0, r, c] == k and targets[1, r, c] == values[label], (i, label)
            x, y = layout["names"][label]
            named = [(int(ny * rows), int(nx * cols)) for nx, ny in layout["names"].values()]
            if named.count((int(y * rows), int(x * cols))) == 1:
                assert int((targets[2] == k).sum()) == 1 and targets[2, int(y * rows), int(x * cols)] == k


def _moved_by(train) -> tuple[object, set[str]]:
    """`train(model, processor)` on a fresh 2-layer demo model: (what it returned, the top-level modules whose
    parameters moved)."""
    import torch

    from ernie45.demo import default_model_path
    from ernie45.model import Ernie45ForConditionalGeneration

    config = ernie45.presets.get("demo-omni", num_hidden_layers=2, moe_layer_end_index=1)
    proc = configure(ernie45.load_processor(default_model_path()))
    torch.manual_seed(0)
    model = Ernie45ForConditionalGeneration(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = train(model, proc)
    return out, {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _encoder_stage(kinds: list[str], steps: int, **options):
    """A few encoder-stage steps of `kinds` on a fresh 2-layer demo model: (model, processor, the stage's stats, the
    top-level modules whose parameters moved)."""
    from ernie45.demo.encoders import pretrain_encoders

    def train(model, proc):
        return model, proc, pretrain_encoders(model, proc, steps=steps, batch=4, generator="wide", kinds=kinds,
                                              **options)  # fmt: skip

    (model, proc, stats), moved = _moved_by(train)
    return model, proc, stats, moved


def test_a_speech_only_encoder_stage_trains_only_the_audio_path_and_measures_the_held_out_voices(caplog):
    from ernie45.demo.encoders import pretrain_encoders

    with caplog.at_level(logging.INFO, logger="ernie45.train"):
        model, proc, stats, moved = _encoder_stage(["speech"], steps=3, speech_heldout_every=2)
    assert set(stats) == {"speech clips", "loss", "held-out speech clips"}
    assert 0.0 <= stats["held-out speech clips"] <= 1.0
    heard = [r.getMessage() for r in caplog.records if "held-out speech clips" in r.getMessage()]
    assert [m.split()[1] for m in heard] == ["2/3", "3/3"], heard  # every 2 steps and at the end
    assert moved == {"audio_tower", "audio_resampler"}, moved  # measuring trains nothing
    with pytest.raises(ValueError, match="kinds \\['sound'\\]; name some of pictures, charts, videos, speech, glyphs"):
        pretrain_encoders(model, proc, steps=1, kinds=["sound"])
    with pytest.raises(ValueError, match="speech_heldout_every 5 measures the speech kind: .* name speech among"):
        pretrain_encoders(model, proc, steps=1, kinds=["charts"], speech_heldout_every=5)


def test_a_glyph_page_says_where_each_glyph_is_and_a_glyph_stage_trains_only_the_vision_path():
    import random

    import numpy as np

    from ernie45.demo import wide

    for seed in range(6):
        img, where = wide.glyph_page(random.Random(seed))
        w, h = img.size
        grey = np.asarray(img.convert("L"), dtype=np.float32)
        background = float(np.median(grey))
        assert len(where) >= 4 and set(where.values()) <= set(wide.GLYPHS)
        for (x, y), glyph in where.items():  # ink near every centre the page names, as it names it
            near = grey[max(0, int(y * h) - 3) : int(y * h) + 4, max(0, int(x * w) - 3) : int(x * w) + 4]
            assert np.abs(near - background).max() > 60, (seed, glyph, x, y)
    _, _, stats, moved = _encoder_stage(["glyphs"], steps=2)
    assert set(stats) == {"glyphs", "loss"}
    assert moved == {"vision_tower", "resampler_model"}, moved


def test_score_rules():
    assert score("colour", "The star is red.", "The star is red.") == 1.0
    assert score("colour", "The star is blue.", "The star is red.") == 0.0
    assert score("spoken digits", "three five", "three five nine") == pytest.approx(2 / 3)
    worked = "9 plus 3 is 12; 5 plus 7 plus 1 is 13; so 59 plus 73 is 132."
    assert score("arithmetic", "59 plus 73 is 132.", worked) == 1.0  # the conclusion is what counts
    assert score("arithmetic", worked.replace("132", "131"), worked) == 0.0
    assert score("arithmetic", "9 plus 3 is 12; so 59 plus 73 is 132.", "59 plus 73 is 131.") == 0.0
    call = 'You said: order four.\n<tool_call>\n{"name": "cancel_order", "arguments": {"order_id": "%s"}}\n</tool_call>'
    assert score("tool call", call % "4", call % "4") == score("tool choice", call % "5", call % "4") == 1.0
    assert score("tool call", call % "5", call % "4") == 0.0
    assert score("tool choice", call.replace("cancel", "report") % "4", call % "4") == 0.0


def test_every_reference_answer_fits_the_evaluations_token_budget():
    """A budget below an answer's length scores it 0 whatever the model writes (64 tokens cut every tool call)."""
    from ernie45.demo.eval import ANSWER_TOKENS, GENERATORS

    tokenizer = load_processor(DEMO_DIR).tokenizer
    longest = {}
    for name in ("train", "heldout"):
        for f, family in enumerate(TASKS):
            for j in range(12):
                skill, _, answer = TASKS[family](random.Random(1_000 * f + j), GENERATORS[name])
                longest[skill] = max(longest.get(skill, 0), len(tokenizer(answer)["input_ids"]))
    assert {"tool call", "document summary", "moderation"} <= set(longest)
    assert max(longest.values()) < ANSWER_TOKENS, longest


def test_worked_sums_and_differences_add_up_column_by_column():
    """Every sum and difference on 0..100: the conclusion is the plain answer, and the columns' results, read
    back (the last in full, then each earlier one's units digit), are that answer's digits."""
    from ernie45.demo.tasks import worked

    for a in range(101):
        for b in range(101):
            for op, want in (("plus", a + b), ("minus", a - b)):
                text = worked(a, op, b)
                head, _, conclusion = text.rpartition("so ")
                assert conclusion == f"{a} {op} {b} is {want}."
                if not head:  # one-digit sums and differences that stay >= 0 are one sentence
                    assert max(a, b) < 10 and want >= 0
                    continue
                assert head.startswith(f"{max(a, b)} is more than {min(a, b)}: ") == (want < 0)
                columns = [int(step.rsplit(" is ", 1)[1]) for step in head.split(": ")[-1].rstrip("; ").split("; ")]
                assert len(columns) == len(str(max(a, b)))
                digits = str(columns[-1]) + "".join(str(c % 10) for c in reversed(columns[:-1]))
                assert int(digits) == abs(want), text
    assert worked(12, "times", 11) == "12 times 11 is 132."


def test_smoke_recipe_trains(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ernie45", "train", "recipes/demo-omni-smoke.yaml",
                        f"train.output_dir={tmp_path}", "train.disable_tqdm=true", "train.max_steps=6",
                        "train.save_steps=3", "data.demo.image_side=168"],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "checkpoint-3").is_dir()
    llm = ernie45.LLM(tmp_path / "final")
    out = llm.chat([{"role": "user", "content": "Who are you?"}], ernie45.SamplingParams(max_tokens=4))
    assert out[0].completion_tokens >= 1
    for folder in ("checkpoint-3", "final"):  # each reads pictures at the size it was trained at (not the base's)
        proc = load_processor(tmp_path / folder)
        assert proc.image.min_pixels == proc.image.max_pixels == 168 * 168, folder


def test_a_misspelt_encoder_stage_key_is_refused_by_name(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ernie45", "train", "recipes/demo-omni-smoke.yaml",
                        f"train.output_dir={tmp_path}", "data.demo.encoder_pretrain.step=5"],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "data.demo.encoder_pretrain: ['step'] is not a key; known: steps, batch, lr" in r.stderr


def test_an_encoder_stage_of_phases_runs_each_in_order_and_refuses_a_wrong_form():
    from ernie45.demo.plugins import _prepare

    phases = [{"steps": 1, "batch": 2, "generator": "wide", "kinds": ["glyphs"]},
              {"steps": 1, "batch": 2, "generator": "wide", "kinds": ["speech"]}]  # fmt: skip

    def train(model, proc):
        _prepare(model, proc, {"image_side": 112, "encoder_pretrain": phases}, seed=0)
        return model, proc

    (model, proc), moved = _moved_by(train)
    assert moved == {"vision_tower", "resampler_model", "audio_tower", "audio_resampler"}, moved
    with pytest.raises(ValueError, match="a mapping \\(one phase\\) or a list of them"):
        _prepare(model, proc, {"encoder_pretrain": ["glyphs"]}, seed=0)
    with pytest.raises(ValueError, match="\\['step'\\] is not a key"):
        _prepare(model, proc, {"encoder_pretrain": [{"steps": 1}, {"step": 1}]}, seed=0)


def test_an_encoder_stage_weights_each_kinds_losses_by_its_factor_and_refuses_a_kind_it_does_not_draw():
    """The same first step (same model, same data) with the glyph pages' losses weighted 0, 1 and 3: the summed loss
    moves by the glyph part times the factor, the speech part stays."""
    from ernie45.demo.encoders import pretrain_encoders

    def loss(weights):
        def train(model, proc):
            return pretrain_encoders(model, proc, steps=1, batch=2, generator="wide", kinds=["glyphs", "speech"],
                                     weights=weights)["loss"]  # fmt: skip

        return _moved_by(train)[0]

    none, one, three = loss({"glyphs": 0}), loss(None), loss({"glyphs": 3.0})
    assert 0 < none < one < three
    assert three - none == pytest.approx(3 * (one - none), rel=1e-4)
    with pytest.raises(ValueError, match="weights \\{'charts': 2\\}; give a factor >= 0 to some of the kinds"):
        loss({"charts": 2})


def test_shipped_demo_model_is_the_default():
    """`ernie45 generate` with no --model answers from the embedded model; `LLM()` loads it."""
    r = subprocess.run([sys.executable, "-m", "ernie45", "generate", "Who are you?", "--max-tokens", "40",
                        "--temperature", "0", "--json"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    assert "demo model" in json.loads(r.stdout)["text"]
    llm = ernie45.LLM()
    assert llm.model.config.num_hidden_layers == ernie45.presets.get("demo-omni").num_hidden_layers


def test_shipped_demo_model_quick_eval():
    """A quick evaluation on the held-out generator (pictures, clips and voices drawn by code the model was not
    trained on), with floors the shipped model clears by two answers or more (its card has the full table)."""
    from ernie45.demo.eval import evaluate

    results = evaluate(ernie45.LLM(), n=20, seed=123_456_789, generator="heldout",
                       families=("image", "video", "audio", "text"))  # fmt: skip
    for skill, floor in QUICK_FLOORS.items():
        assert results[skill][0] >= floor, (skill, results[skill])


# measured (stage 34): who 4/4, greet 10/10, direction 8/18, spoken digits 0.89 of 17, colour 7/8, count 4/7; each
# floor about two answers below (chance: direction 1/4, spoken digits ~0, colour 1/6, count 1/4)
QUICK_FLOORS = {"who": 0.5, "greet": 0.8, "direction": 0.3, "spoken digits": 0.75, "colour": 0.6, "count": 0.25}


def test_multi_turn_media_samples_ask_distinct_questions_about_one_picture():
    from ernie45.demo.tasks import draw

    rng = random.Random(4)
    convs = [draw(rng, {"image": 1.0, "video": 1.0}, turns=3, mixed=0.0) for _ in range(40)]
    assert max(sum(m["role"] == "user" for m in msgs) for _, msgs, _ in convs) == 3
    for _, msgs, answer in convs:
        users = [m for m in msgs if m["role"] == "user"]
        media = [p for m in users for p in m["content"] if p["type"] != "text"]
        assert len(media) == 1 and media[0] in users[0]["content"]  # the picture comes once, first
        questions = [p["text"] for m in users for p in m["content"] if p["type"] == "text"]
        assert len(set(questions)) == len(questions) and answer
    assert len(draw(random.Random(1), {"audio": 1.0}, turns=3, mixed=0.0)[1]) == 1  # audio stays one turn


def test_describe_last_keeps_the_description_after_the_questions_it_would_answer():
    from ernie45.demo.tasks import draw

    def order(describe_last: bool) -> list[list[str]]:
        rng = random.Random(11)
        convs = [draw(rng, {"image": 1.0}, turns=3, describe_last=describe_last, mixed=0.0) for _ in range(60)]
        texts = [[p["text"] for m in msgs if m["role"] == "user" for p in m["content"] if p["type"] == "text"]
                 for _, msgs, _ in convs]  # fmt: skip
        return [["Describe" in q for q in qs] for qs in texts]

    early = lambda flags: any(flags[:-1]) and not flags[-1]  # noqa: E731  a description before another question
    assert any(early(f) for f in order(False))  # drawn order: descriptions do come first sometimes
    assert not any(any(f[:-1]) for f in order(True))  # with describe_last only ever the last question


def test_a_missing_wordnet_is_named_not_replaced(monkeypatch, capsys):
    from ernie45.cli import main
    from ernie45.demo import tasks

    monkeypatch.setattr(tasks, "WORDNET", tasks.Path("/nonexistent/data.noun"))
    tasks.definitions.cache_clear()
    try:
        assert main(["eval-demo", "--n", "10"]) == 2  # the text family defines a word among 10
    finally:
        tasks.definitions.cache_clear()
    err = capsys.readouterr().err
    assert "apt-get install wordnet-base" in err and "Traceback" not in err


def test_split_numbers_cuts_every_number_into_digits_and_keeps_the_rest(tmp_path):
    """`model.split_numbers` (a recipe key): numbers become their first digit, with the space, then one token per
    digit; the vocabulary, the ids and every text without digits stay as they were, and the trained model's
    saved tokenizer keeps the cut."""
    from transformers import AutoTokenizer

    from ernie45.demo.tokenizer import split_numbers
    from ernie45.train.recipe import DEFAULTS, build_model, merge

    cfg = merge(DEFAULTS, {"model": {"path": str(DEMO_DIR), "split_numbers": True}})
    _, proc = build_model(cfg)
    tok, plain = proc.tokenizer, AutoTokenizer.from_pretrained(DEMO_DIR)
    assert split_numbers(tok) == 0  # done once: nothing left to drop
    assert len(tok) == len(plain) and tok.convert_tokens_to_ids(["Ġ4", "7"]) == plain.convert_tokens_to_ids(["Ġ4", "7"])
    for n in range(0, 1000, 7):
        digits = str(n)
        assert tok.tokenize(f"is {n}.") == ["is", "Ġ" + digits[0], *digits[1:], "."]
    words = "What color is the star? The value of C is 5. Hello! I see a red circle."
    assert tok(words)["input_ids"] == plain(words)["input_ids"]
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).tokenize(" 385") == ["Ġ3", "8", "5"]


def test_eval_demo_takes_every_generator_it_names(capsys):
    from ernie45.cli import main

    assert main(["eval-demo", "--generator", "first", "--n", "1", "--later", "0"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("copying from the context (random runs given twice, the second predicted): ")
    assert "\n\nfirst generator" in out and "count" in out and "moderation" not in out


def test_a_copying_stage_guides_two_heads_into_induction_on_runs_given_twice_at_distances_varying_per_row():
    """The runs: each row ends in a run given twice, at one distance with spread 0 and at a distance of its own
    per row with spread 1. The stage, its guidance on, takes a fresh model from chance to copying most of the
    second run at every distance. By default only the decoder layers learn."""
    import torch

    from ernie45.demo import default_model_path
    from ernie45.demo.induction import IGNORE, _ordinary, _runs_twice, copy_score, pretrain_copying
    from ernie45.demo.plugins import _prepare
    from ernie45.model import Ernie45ForConditionalGeneration

    proc = ernie45.load_processor(default_model_path())
    ordinary = _ordinary(proc.tokenizer, 10)
    for spread in (0.0, 1.0):
        ids, target, source = _runs_twice(ordinary, torch.Generator().manual_seed(0), 16, 10, spread)
        distances = set()
        for row in range(16):
            scored = (target[row] != IGNORE).nonzero().flatten()
            assert torch.equal(ids[row, scored + 1], target[row, scored])  # the next token ...
            assert torch.equal(ids[row, source[row, scored]], target[row, scored])  # ... which the first copy holds
            assert scored[-1] == ids.shape[1] - 2 and torch.all(source[row, scored] < scored)
            distances.add(int(scored[0] - source[row, scored[0]]) + 1)
        assert distances == {10} if spread == 0 else len(distances) > 5, (spread, distances)

    # a fresh trunk, its embeddings learning too (frozen at their small initial scale, the heads found nothing to
    # match); 33 s on 2 cores. Unguided, the same 300 steps copied 0.4% (`benchmarks/copying.py --guide 0`).
    config = ernie45.presets.get("demo-omni", num_hidden_layers=2, hidden_size=128, intermediate_size=256, head_dim=32)
    torch.manual_seed(0)
    model = Ernie45ForConditionalGeneration(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = copy_score(model, proc.tokenizer, length=12, seed=99)
    stats = pretrain_copying(model, proc.tokenizer, steps=300, batch=32, length=12, guide=300, cosine=False,
                             everything=True)  # fmt: skip
    after = copy_score(model, proc.tokenizer, length=12, seed=99)
    assert first < 0.05 and after > 0.7 and stats["guide_found"] < 1.0, (first, after, stats)
    moved = {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"layers", "embed_tokens", "norm"}, moved
    model = Ernie45ForConditionalGeneration(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pretrain_copying(model, proc.tokenizer, steps=1, length=12, guide=1)  # by default the decoder layers alone
    moved = {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"layers"}, moved
    # hold: layers 2.. start at the identity (outputs zeroed) and hold still while guided, then train too
    model = Ernie45ForConditionalGeneration(ernie45.presets.get("demo-omni", num_hidden_layers=4, hidden_size=64,
                                                                intermediate_size=128, head_dim=16))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]  # (a router's correction bias is not)
    pretrain_copying(model, proc.tokenizer, steps=2, length=12, guide=2, hold=2)
    late = {n: p for n, p in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.3."))}
    outputs = [n for n in late if ".o_proj." in n or "down_proj" in n]
    assert len(outputs) == 2 * 5 and all(torch.all(late[n] == 0) for n in outputs)  # o_proj, 3 expert groups, shared
    assert all(torch.equal(p, before[n]) for n, p in late.items() if n not in outputs)
    first_o = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(model.model.layers[1].self_attn.o_proj.weight, before[first_o])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # released at the end
    pretrain_copying(model, proc.tokenizer, steps=2, length=12, guide=1, hold=2)
    text_path = [n for n in outputs if ".vision." not in n and ".audio." not in n]  # what text tokens reach
    assert len(text_path) == 2 * 3 and all(bool(torch.any(late[n] != 0)) for n in text_path)  # step 2: trained
    for wrong in ({"hold": 1, "guide": 1}, {"hold": 4, "guide": 1}, {"hold": 2}):
        with pytest.raises(ValueError, match="give guide > 0 and hold from 2 to 3"):
            pretrain_copying(model, proc.tokenizer, steps=1, length=12, **wrong)
    with pytest.raises(ValueError, match="copy_pretrain: \\['step'\\] is not a key; known: steps, batch, length"):
        _prepare(model, proc, {"copy_pretrain": {"step": 1}}, seed=0)
    with pytest.raises(ValueError, match="data.demo.copy_pretrain: give steps \\(no default\\)"):
        _prepare(model, proc, {"copy_pretrain": {"batch": 2}}, seed=0)
    with pytest.raises(ValueError, match="copy_pretrain is a mapping"):
        _prepare(model, proc, {"copy_pretrain": [{"steps": 1}]}, seed=0)
