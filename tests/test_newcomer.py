"""The habits users bring, on the embedded demo model: transformers' generate / AutoProcessor / pipeline, vLLM's
LLM and SamplingParams, hub ids, and the command line's small conveniences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

import ernie45
from ernie45 import LLM, SamplingParams
from ernie45.demo import default_model_path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = str(ROOT / "examples/shapes.png")
QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def demo() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_model(demo):
    return AutoModelForImageTextToText.from_pretrained(demo)


@pytest.fixture(scope="module")
def shapes_answer(demo) -> str:
    """ernie45's own greedy answer about examples/shapes.png: each client's path must carry the picture to the same
    answer (whether the model counts right is eval-demo's business, not these tests')."""
    answer = LLM(str(demo)).chat([_image_message({"image": SHAPES})], SamplingParams(max_tokens=20, temperature=0))
    assert "shapes" in answer[0].text, answer[0].text  # it answered the question about the picture
    return answer[0].text


def _image_message(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", **image}, {"type": "text", "text": QUESTION}]}]


def test_transformers_generate_stops_at_the_end_of_the_answer_with_the_cache_on(demo):
    tok = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo)
    assert model.config.use_cache and model.generation_config.use_cache
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")  # fmt: skip
    out = model.generate(**inputs, max_new_tokens=60)[0, inputs["input_ids"].shape[1] :]
    assert len(out) < 40 and out[-1].item() == tok.convert_tokens_to_ids("<|end_of_sentence|>")
    assert "19" in tok.decode(out, skip_special_tokens=True)


def test_auto_processor_carries_the_picture_into_generate(demo, hf_model, shapes_answer):
    processor = AutoProcessor.from_pretrained(demo)
    assert isinstance(processor, ernie45.Ernie45Processor)
    answers = {}
    for name, message in (("image", _image_message({"url": SHAPES})),
                          ("none", [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])):  # fmt: skip
        inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")  # fmt: skip
        assert ("pixel_values" in inputs) == (name == "image")
        out = hf_model.generate(**inputs, max_new_tokens=20)[0, inputs["input_ids"].shape[1] :]
        answers[name] = processor.decode(out, skip_special_tokens=True)
    assert answers["image"] != answers["none"]
    assert answers["image"].strip() == shapes_answer.strip()
    text = processor.apply_chat_template(_image_message({"path": SHAPES}), add_generation_prompt=True)
    assert "<|IMAGE_PLACEHOLDER|>" in text


def test_image_text_to_text_pipeline(demo, shapes_answer):
    pipe = pipeline("image-text-to-text", model=str(demo))
    image = Image.open(SHAPES).convert("RGB")
    out = pipe(text=_image_message({"image": image}), max_new_tokens=20, return_full_text=False)
    assert out[0]["generated_text"].strip() == shapes_answer.strip()


def test_media_that_would_be_dropped_is_refused(demo):
    image = Image.open(SHAPES)
    tok = AutoTokenizer.from_pretrained(demo)
    with pytest.raises(ValueError, match="reads text only"):
        tok("How many shapes?", images=image)
    processor = AutoProcessor.from_pretrained(demo)
    with pytest.raises(ValueError, match="no placeholder"):
        processor(text="How many shapes?", images=image)
    batch = processor(text="Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>How many?", images=image)
    assert "pixel_values" in batch and batch["image_grid_thw"].shape == (1, 3)
    message = _image_message({"url": SHAPES})
    with pytest.raises(ValueError, match="does not truncate"):  # options that would be dropped are refused
        processor.apply_chat_template(message, tokenize=True, truncation=True, max_length=8)
    with pytest.raises(ValueError, match="torch tensors"):
        processor(text="How many?", return_tensors="np")
    with pytest.raises(TypeError, match="does not take frobnicate"):
        processor.apply_chat_template(message, tokenize=True, frobnicate=1)
    plain = processor.apply_chat_template(message)
    assert processor.apply_chat_template(message, chat_template="{{ 'X' }}") == "X"
    assert processor.apply_chat_template(message) == plain  # a per-call template does not stick


def test_vllm_habits(demo, capsys, shapes_answer):
    llm = LLM(model=str(demo), enforce_eager=True, seed=3)
    sp = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=1)
    outs = llm.generate(["User: hi\nAssistant: ", "Hello"], sampling_params=sp)
    assert len(outs) == 2 and all(len(o.outputs) == 3 for o in outs)
    assert outs[0].outputs[0].text == outs[0].text and [o.index for o in outs[0].outputs] == [0, 1, 2]
    assert outs[1].prompt == "Hello" and outs[1].prompt_token_ids == llm.processor.tokenizer.encode("Hello")
    assert outs[0].completion_tokens == sum(len(o.token_ids) for o in outs[0].outputs)
    assert len({o.text for o in outs[0].outputs}) > 1  # sampled answers, not one answer thrice
    prompt = llm.processor.apply_chat_template(_image_message({"image": SHAPES}))
    greedy = SamplingParams(max_tokens=20, temperature=0)
    (with_image,) = llm.generate({"prompt": prompt, "multi_modal_data": {"image": SHAPES}}, greedy)
    assert with_image.outputs[0].text == shapes_answer
    with pytest.raises(ValueError, match="placeholder"):
        llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": SHAPES}})
    with pytest.raises(ValueError, match="multi_modal_data takes"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"pdf": SHAPES}})
    with pytest.raises(TypeError, match="gpu_memory_utilization"):
        LLM(model=str(demo), gpu_memory_utilization=0.9)
    capsys.readouterr()
    llm.generate(["Hello", "Hi"], greedy, use_tqdm=True)  # vLLM's progress switch draws a bar, not nothing
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err
    llm.generate(["Hello", "Hi"], greedy)
    assert "generating" not in capsys.readouterr().err
    chats = llm.chat([{"role": "user", "content": "What is 12 plus 7?"}], sampling_params=greedy)
    assert "19" in chats[0].outputs[0].text


def test_serve_takes_the_model_as_vllm_serve_does():
    from ernie45.cli import build_parser
    from ernie45.cli import main as cli

    assert build_parser().parse_args(["serve", "some/dir"]).model_dir == "some/dir"
    assert cli(["serve", "a", "--model", "b"]) == 2


def test_hub_ids_resolve_from_the_local_cache_and_say_how_to_fetch_otherwise(tmp_path, demo):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-ernie" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in demo.iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    (cache / "models--someone--tiny-ernie" / "refs").mkdir()
    (cache / "models--someone--tiny-ernie" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = "import ernie45; m = ernie45.load('someone/tiny-ernie'); print(type(m).__name__)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "Ernie45ForConditionalGeneration", run.stderr
    gen = subprocess.run([sys.executable, "-m", "ernie45", "generate", "hi", "--model", "someone/absent"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert gen.returncode == 2 and "hf download someone/absent" in gen.stderr and "Traceback" not in gen.stderr


def test_cli_version_sampling_options_and_help(capsys):
    from ernie45 import __version__
    from ernie45.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["--version"])
    assert __version__ in capsys.readouterr().out
    args = ["generate", "What is 12 plus 7?", "--top-k", "1", "--json", "--repetition-penalty", "1.0", "--stop", "; so",
            "--max-tokens", "40"]  # fmt: skip
    assert cli(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["finish_reason"] == "stop" and plain["text"] == "2 plus 7 is 9; 1 plus 0 is 1"  # cut at the stop text
    assert cli([*args, "--system", "Answer briefly."]) == 0
    with_system = json.loads(capsys.readouterr().out)
    assert with_system["prompt_tokens"] > plain["prompt_tokens"] + 2  # the system prompt went into the prompt
    chat = subprocess.run([sys.executable, "-m", "ernie45", "chat"], input="/help\n/exit\n", capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert "/image PATH" in chat.stdout and "forget the conversation" in chat.stdout


def test_processor_save_and_load_round_trip(tmp_path, demo):
    processor = AutoProcessor.from_pretrained(demo)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["processor_class"] == "Ernie45Processor"
    again = ernie45.load_processor(tmp_path)
    a = processor.apply_chat_template(_image_message({"url": SHAPES}), tokenize=True, return_dict=True)
    b = again.encode_chat(_image_message({"image": SHAPES}))
    assert a["input_ids"][0].tolist() == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])
