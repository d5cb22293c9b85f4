"""Tokenizer, chat templates and the generation engine, on real tokenizers and tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_fixtures import EXTRA, write_chat_checkpoint, write_spm_tokenizer
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, pipeline

import ernie45
from ernie45 import LLM, SamplingParams
from ernie45.engine.detokenize import IncrementalDetokenizer
from ernie45.processing.chat_template import TEXT_TEMPLATE, split_reasoning
from ernie45.processing.tokenizer import load_tokenizer

GREEDY = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat_text"))


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat_vl"), vision=True)


@pytest.fixture(scope="module")
def llm(text_dir):
    return LLM(text_dir)


def test_sentencepiece_and_tokenizer_json_layouts(tmp_path):
    write_spm_tokenizer(tmp_path / "spm")
    tok = load_tokenizer(tmp_path / "spm")
    for i, t in enumerate(EXTRA):
        assert tok.convert_tokens_to_ids(t) == 400 + i
    text = "<|begin_of_sentence|>User: Hello 你好 🙂\n<|IMAGE_PLACEHOLDER|><think>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 400 and 402 in ids and ids[-1] == EXTRA.index("<think>") + 400
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path / "json")
    assert (tmp_path / "json/tokenizer.json").is_file()
    again = load_tokenizer(tmp_path / "json")
    assert again.encode(text, add_special_tokens=False) == ids
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(tmp_path)


def test_templates_render_like_transformers(text_dir, vl_dir, tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    proc = ernie45.load_processor(text_dir)
    assert proc.chat_template == TEXT_TEMPLATE
    expected = (
        "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>User: And now?\nAssistant: "
    )
    assert proc.apply_chat_template(conv) == expected
    vl = ernie45.load_processor(vl_dir)
    parts = [
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": "this"},
        {"type": "video", "video": "b.mp4"},
        {"type": "image", "image": "c"},
    ]
    media = [{"role": "user", "content": parts}]
    rendered = vl.apply_chat_template(media)
    assert "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>this" in rendered
    assert "Video 1:<|VIDEO_START|>" in rendered and "Picture 2:" in rendered
    assert rendered.endswith("\nAssistant: <think>\n\n</think>\n\n")
    assert vl.apply_chat_template(media, enable_thinking=True).endswith("\nAssistant: <think>")
    vl.save_pretrained(tmp_path)  # what transformers renders from the saved files is the same text
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(media, tokenize=False, add_generation_prompt=True) == rendered
    # a checkpoint's own template wins over the built-in one
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert ernie45.load_processor(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_reasoning_is_split_from_the_answer():
    assert split_reasoning("<think>\nlet me see\n</think>\n\nIt is 4.") == ("let me see", "It is 4.")
    assert split_reasoning("plan</think>answer") == ("plan", "answer")
    assert split_reasoning("just text") == (None, "just text")


def test_greedy_matches_transformers_generate(text_dir, llm, tmp_path):
    ernie45.export(text_dir, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "Ernie4_5_MoeForCausalLM"
    prompt = llm.processor.tokenizer.encode("User: Hello world\nAssistant: ", add_special_tokens=False)
    ours = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert ours.token_ids == theirs[0, len(prompt) :].tolist()
    assert len(set(ours.token_ids)) > 1  # a path that goes somewhere, not one repeated token


def test_greedy_image_video_prompt_matches_transformers(vl_dir, tmp_path):
    from test_processing import _mp4

    llm = LLM(vl_dir)
    img = Image.fromarray((np.random.RandomState(0).rand(60, 90, 3) * 255).astype(np.uint8))
    llm.processor.video.min_pixels = llm.processor.video.max_pixels = 56 * 56
    llm.processor.video.min_frames = llm.processor.video.max_frames = 4
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": img},
                {"type": "video", "video": _mp4()},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ours = llm.chat(conv, params)[0]
    ernie45.export(vl_dir, tmp_path)
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    enc = llm.processor.encode_chat(conv)
    batch = llm.processor.collate([enc])
    ids = batch["input_ids"]
    c = ref.config
    mm = torch.zeros_like(ids).masked_fill(ids == c.image_token_id, 1).masked_fill(ids == c.video_token_id, 2)
    moe = mm.masked_fill((ids == c.image_start_token_id) | (ids == c.image_end_token_id), 1)
    moe = moe.masked_fill((ids == c.video_start_token_id) | (ids == c.video_end_token_id), 2)
    out = ref.generate(
        **batch, mm_token_type_ids=mm, moe_mm_token_type_ids=moe, max_new_tokens=12, do_sample=False, eos_token_id=None
    )
    assert ours.token_ids == out[0, ids.shape[1] :].tolist()
    blank = llm.chat([{"role": "user", "content": [{"type": "text", "text": "What happens?"}]}], params)[0]
    assert blank.token_ids != ours.token_ids  # the media changed the answer


def test_batch_of_different_lengths_equals_each_alone(llm):
    prompts = ["Hello world", "你好，世界。今天天气很好。 The quick brown fox", "ERNIE"]
    batched = llm.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched, strict=True):
        assert llm.generate(p, GREEDY)[0].token_ids == b.token_ids
        assert b.prompt_tokens == len(llm.processor.tokenizer.encode(p, add_special_tokens=False))


def test_sampling_controls(llm):
    hot = SamplingParams(max_tokens=24, temperature=5.0, seed=7)
    a, b = llm.generate("Hello", hot)[0], llm.generate("Hello", hot)[0]
    assert a.token_ids == b.token_ids  # seeded
    other = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=5.0, seed=8))[0]
    assert other.token_ids != a.token_ids
    greedy = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=0))[0]
    assert llm.generate("Hello", SamplingParams(max_tokens=24, temperature=5.0, top_k=1, seed=3))[0].token_ids == (
        greedy.token_ids
    )
    assert llm.generate("Hello", SamplingParams(max_tokens=24, temperature=5.0, top_p=1e-6, seed=3))[0].token_ids == (
        greedy.token_ids
    )
    assert llm.generate("Hello", SamplingParams(max_tokens=24, temperature=5.0, min_p=1.0, seed=3))[0].token_ids == (
        greedy.token_ids
    )
    assert greedy.finish_reason == "length" and greedy.completion_tokens == 24
    penalised = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=0, repetition_penalty=5.0))[0]
    assert len(set(penalised.token_ids)) > len(set(greedy.token_ids))
    for kw in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        assert llm.generate("Hello", SamplingParams(max_tokens=24, temperature=0, **kw))[0].token_ids != (
            greedy.token_ids
        )
    first = greedy.token_ids[3]
    stopped = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[first]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[:3]
    piece = greedy.text[4:7]
    by_string = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=0, stop=[piece]))[0]
    assert by_string.finish_reason == "stop" and by_string.text == greedy.text[: greedy.text.find(piece)]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_stream_deltas_are_whole_characters_and_add_up(llm):
    tok = llm.processor.tokenizer
    ids = tok.encode("a🙂b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "a🙂b" and all("\ufffd" not in d for d in deltas)
    assert len(ids) > 3 and deltas.count("") >= 3  # the emoji's bytes were held back until complete
    params = SamplingParams(max_tokens=30, temperature=3.0, seed=1)
    stream = list(llm.stream("你好", params))
    assert stream[-1].finish_reason == "length"
    assert "".join(d.text for d in stream) == llm.generate("你好", params)[0].text


def test_compiled_decode_matches_eager(text_dir, llm, vl_dir):
    """Fixed-shape decode through torch.compile (inductor on CPU) picks the same greedy tokens as eager decode,
    for a left-padded batch and for an image prompt (3D RoPE: decode continues from the deltas)."""
    compiled = LLM(text_dir, compile=True)
    prompts = ["Hello there, how are", "A much longer prompt that needs padding on the other row"]
    want = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert [c.token_ids for c in compiled.generate(prompts, GREEDY)] == want
    assert compiled.decoder.failed is None and len(compiled.decoder.caches) == 1
    assert [c.token_ids for c in compiled.generate(prompts[::-1], GREEDY)] == want[::-1]  # cache reused
    assert len(compiled.decoder.caches) == 1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    eager_vl, compiled_vl = LLM(vl_dir), LLM(vl_dir, compile=True)
    assert compiled_vl.chat(chat, GREEDY)[0].token_ids == eager_vl.chat(chat, GREEDY)[0].token_ids


def test_compiled_decode_falls_back_to_eager_when_the_compiler_fails(text_dir, llm, caplog):
    from ernie45.engine.compiled import CompiledDecoder

    def broken_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    fallback = LLM(text_dir)
    fallback.decoder = CompiledDecoder(fallback.model, backend=broken_backend)
    with caplog.at_level("WARNING", logger="ernie45.engine"):
        got = fallback.generate("Hello there", GREEDY)[0].token_ids
    assert got == llm.generate("Hello there", GREEDY)[0].token_ids
    assert "this backend cannot compile anything" in fallback.decoder.failed
    assert "decoding eagerly" in caplog.text


def test_kv_cache_is_allocated_once(llm, monkeypatch):
    """One generate call: one slot cache, allocated before the first step; every step writes into its buffers."""
    from ernie45.engine import slots

    made = []
    original = slots.SlotKVCache.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(slots.SlotKVCache, "__init__", spy)
    ptrs = []
    for name in ("update", "reserve"):  # the layer-by-layer path writes through update, the fused one reserves
        real = getattr(slots._DecodeView, name)

        def spy_step(self, *a, _real=real, **kw):
            out = _real(self, *a, **kw)
            ptrs.append(out[0].data_ptr())
            return out

        monkeypatch.setattr(slots._DecodeView, name, spy_step)
    llm.generate(["Hello", "ERNIE is"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert len(made) == 1 and ptrs
    assert set(ptrs) <= {t.data_ptr() for t in made[0].k}  # every decode step used the buffers made at the start


def test_transformers_pipeline_and_generate_on_an_ernie45_checkpoint(text_dir, tmp_path):
    model = ernie45.load(text_dir)
    model.save_pretrained(tmp_path)
    ernie45.load_processor(text_dir).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ernie45"
    gen = pipeline("text-generation", model=str(tmp_path))
    out = gen("Hello world", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello world")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    inputs = tok(["Hello world"], return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8) or out.shape[1] <= inputs["input_ids"].shape[1] + 8
    greedy = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    ours = LLM(tmp_path).generate("Hello world", SamplingParams(max_tokens=8, temperature=0))[0]
    assert greedy[0, inputs["input_ids"].shape[1] :].tolist()[: len(ours.token_ids)] == ours.token_ids
