"""Multi-token prediction (issue #31): the MTP layer loads from a checkpoint's `mtp_*` weights without changing the
next-token logits, drafts for the scheduler with greedy answers identical to plain decoding, trains from a recipe
while the rest of the model holds still, and is refused clearly where a model has none."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ernie45
from ernie45.demo import default_model_path
from ernie45.engine import LLM, SamplingParams
from ernie45.engine.batcher import BatchEngine
from ernie45.engine.speculative import SpeculativeConfig
from ernie45.model.mtp import with_mtp

PROMPTS = ["Who are you?", "What is 23 plus 48?", "What is 7 times 8?", "alpha beta gamma alpha beta gamma alpha"]


def _checkpoint_with_mtp(out: Path, seed: int = 0) -> Path:
    """The embedded demo model plus an MTP layer of random weights, written as a checkpoint."""
    src = Path(default_model_path())
    torch.manual_seed(seed)
    model = with_mtp(ernie45.load(src))
    out.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    return _checkpoint_with_mtp(tmp_path_factory.mktemp("mtp") / "ckpt")


def test_the_mtp_layer_loads_and_leaves_the_next_token_logits_alone(mtp_dir):
    with_layer, plain = ernie45.load(mtp_dir, dtype="float32"), ernie45.load(default_model_path(), dtype="float32")
    assert with_layer.config.num_nextn_predict_layers == 1 and plain.config.num_nextn_predict_layers == 0
    written = load_file(mtp_dir / "model.safetensors")
    assert torch.equal(with_layer.state_dict()["model.mtp_linear_proj.0.weight"],
                       written["model.mtp_linear_proj.0.weight"])  # fmt: skip
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        out = with_layer(input_ids=ids, output_mtp_logits=True)
        assert torch.equal(out.logits, plain(input_ids=ids).logits)
    assert out.mtp_logits.shape == out.logits.shape
    with pytest.raises(ValueError, match="no MTP block"):
        plain(input_ids=ids, output_mtp_logits=True)


def test_mtp_weights_in_a_layout_without_modules_are_kept_aside_with_a_word(mtp_dir, tmp_path, caplog):
    path = tmp_path / "moe_block"
    shutil.copytree(mtp_dir, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.mtp_block.0.mlp.experts.0.up_proj.weight"] = torch.zeros(8, 8)  # an MoE block: not mapped
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="ernie45"):
        model = ernie45.load(path)
    assert model.config.num_nextn_predict_layers == 0
    assert "model.mtp_block.0.mlp.experts.0.up_proj.weight" in model.mtp_state_dict
    assert "does not map" in caplog.text


def test_mtp_drafting_gives_plain_decoding_s_greedy_answers(mtp_dir):
    plain = LLM()
    spec = LLM(str(mtp_dir), speculative_config={"method": "ernie_mtp"})  # vLLM's name for it
    assert spec.speculative.method == "mtp"
    params = SamplingParams(max_tokens=40, temperature=0)
    want, got = plain.generate(PROMPTS, params), spec.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    engine = BatchEngine(spec, max_batch=2, max_len=512, thread=False, speculative=spec.speculative)
    ids = spec.processor.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    handle = engine.submit({"input_ids": ids}, SamplingParams(max_tokens=30, temperature=0))
    while not handle.request.finished:
        engine.step()
    assert handle.request.row.token_ids == plain.generate([ids], SamplingParams(max_tokens=30, temperature=0),
                                                          )[0].token_ids  # fmt: skip
    n = len(handle.request.row.token_ids)
    assert engine.stats["draft_tokens"] >= n - 2  # a draft every step after the first (a random layer: few right)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    assert all(len(o.token_ids) > 0 for o in spec.generate(PROMPTS, sampled))


def test_mtp_without_a_layer_or_with_more_drafts_is_refused_by_name():
    with pytest.raises(ValueError, match="MTP drafts one token per step"):
        SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="choose from ngram, mtp, ernie_mtp"):
        SpeculativeConfig.parse({"method": "eagle"})
    with pytest.raises(ValueError, match="this model has no MTP block"):
        LLM(speculative_config={"method": "mtp"}).generate(["hi"], SamplingParams(max_tokens=2))


def test_a_recipe_trains_the_mtp_layer_alone(tmp_path):
    from ernie45.train.recipe import build_trainer

    src = Path(default_model_path())
    recipe = {
        "model": {"path": str(src), "dtype": "float32", "mtp": 1},
        "data": {"demo": {"seed": 5, "mix": {"arithmetic": 0.7, "text": 0.3}}, "max_tokens": 256},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 2, "learning_rate": 3e-3,
                  "save_steps": 1000, "logging_steps": 5, "disable_tqdm": True},
        "losses": {"mtp": 1.0},
        "freeze": ["base"],
    }  # fmt: skip
    trainer = build_trainer(recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["mtp_loss"] for h in trainer.state.log_history if "mtp_loss" in h]
    assert len(losses) >= 4 and losses[-1] < 0.8 * losses[0], losses
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mtp_" in n for n in changed), sorted(changed)[:5]
