"""Training: memorising a small multimodal set with packing, packing == no packing, LoRA, DPO, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from chat_fixtures import write_chat_checkpoint
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

import ernie45
from ernie45.train import build_trainer, collate_packed, collate_padded, load_samples, pack
from ernie45.train.data import DataError
from ernie45.train.losses import cross_entropy

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("train_vl"), vision=True)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """A small multimodal chat set: coloured squares, plain questions, and one broken line."""
    root = tmp_path_factory.mktemp("data")
    lines = []
    for name, rgb in COLOURS.items():
        img = np.full((56, 56, 3), 255, np.uint8)
        img[14:42, 14:42] = rgb
        path = root / f"{name}.png"
        Image.fromarray(img).save(path)
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(path)},
                                         {"type": "text", "text": "What color is the square?"}]},
            {"role": "assistant", "content": f"It is {name}."}]})  # fmt: skip
    lines.append({"messages": [{"role": "user", "content": "Who are you?"},
                               {"role": "assistant", "content": "A tiny demo model."}]})  # fmt: skip
    text = "\n".join(json.dumps(x) for x in lines) + "\n{broken json\n"
    (root / "chat.jsonl").write_text(text)
    (root / "dpo.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Say hello.", "chosen": "Hello there!", "rejected": "No."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    ]) + "\n")  # fmt: skip
    return root


def _cfg(vl_dir, data_dir, out, **over):
    cfg = {
        "model": {"path": str(vl_dir)},
        "data": {"train": [str(data_dir / "chat.jsonl")], "max_tokens": 256, "pack": True},
        "train": {"output_dir": str(out), "max_steps": 40, "learning_rate": 3e-3, "batch_size": 2, "save_steps": 1000,
                  "logging_steps": 5, "disable_tqdm": True, "warmup_steps": 0, "lr_scheduler": "constant"},
        "losses": {"load_balance": 0.01, "z_loss": 0.001, "orthogonal": 0.001, "bias_update_rate": 0.001},
    }  # fmt: skip
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def test_bad_records_are_reported_with_file_and_line(vl_dir, chat_data):
    proc = ernie45.load_processor(vl_dir)
    samples, problems = load_samples(proc, [chat_data / "chat.jsonl"])
    assert len(samples) == 5 and len(problems) == 1 and "chat.jsonl:6: not JSON" in problems[0]
    with pytest.raises(DataError, match="chat.jsonl:6"):
        load_samples(proc, [chat_data / "chat.jsonl"], on_error="fail")
    first = samples[0]
    targets = proc.tokenizer.decode([t for t in first.labels if t != -100])
    assert targets == "It is red.<|end_of_sentence|>"  # loss on the assistant text and its end marker only
    assert first.media["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_packing_gives_the_same_loss_as_padding(vl_dir, chat_data):
    proc = ernie45.load_processor(vl_dir)
    model = ernie45.load(vl_dir)
    samples, _ = load_samples(proc, [chat_data / "chat.jsonl"])
    from ernie45.train.recipe import positions_for

    pos = positions_for(model)
    rows = pack(samples, 256)
    assert len(rows) < len(samples)  # several samples share a row
    packed = collate_packed(rows, 256, proc.pad_id, pos)
    padded = collate_padded(samples, proc.pad_id, pos)
    assert packed["token_mask"].sum() == padded["token_mask"].sum() == sum(len(s) for s in samples)  # no padding
    inputs = lambda batch: {k: v for k, v in batch.items() if k not in ("labels", "token_mask")}  # noqa: E731
    with torch.no_grad():
        a = cross_entropy(model(**inputs(packed)).logits, packed["labels"])
        b = cross_entropy(model(**inputs(padded)).logits, padded["labels"])
    assert abs(a - b) < 1e-4


def test_tiny_vl_moe_memorises_with_packing(vl_dir, chat_data, tmp_path):
    trainer = build_trainer(_cfg(vl_dir, chat_data, tmp_path))
    before = trainer.model.model.layers[1].mlp.groups["text"].gate.e_score_correction_bias.clone()
    trainer.train()
    losses = [h["lm_loss"] for h in trainer.state.log_history if "lm_loss" in h]
    assert losses[-1] < 0.1 < losses[0]
    assert {"load_balance", "z_loss", "orthogonal", "tokens_per_s"} <= set(trainer.state.log_history[-2])
    after = trainer.model.model.layers[1].mlp.groups["text"].gate.e_score_correction_bias
    assert not torch.equal(before, after)  # the aux-loss-free bias update ran
    llm = ernie45.LLM(trainer.model, processor=trainer.processor)
    img = chat_data / "blue.png"
    conv = [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                         {"type": "text", "text": "What color is the square?"}]}]  # fmt: skip
    answer = llm.chat(conv, ernie45.SamplingParams(max_tokens=30, temperature=0))[0]
    assert answer.text == "It is blue." and answer.finish_reason == "stop"


def test_lora_step_changes_only_adapters(vl_dir, chat_data, tmp_path):
    cfg = _cfg(vl_dir, chat_data, tmp_path, lora={"r": 4, "targets": ["attention", "experts", "shared_experts"]},
               train={"max_steps": 1})  # fmt: skip
    trainer = build_trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any(".groups." in k for k in changed)  # the routed experts got adapters too
    assert any("shared_experts" in k for k in changed)


def test_dpo_step_raises_the_margin(vl_dir, chat_data, tmp_path):
    cfg = _cfg(vl_dir, chat_data, tmp_path, data={"train": [str(chat_data / "dpo.jsonl")], "kind": "dpo"},
               dpo={"beta": 0.5}, train={"max_steps": 6, "logging_steps": 1, "learning_rate": 1e-3})  # fmt: skip
    trainer = build_trainer(cfg)
    trainer.train()
    margins = [h["dpo_margin"] for h in trainer.state.log_history if "dpo_margin" in h]
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and margins[-1] > 0.05


def test_kill_and_resume_gives_the_same_loss_curve(vl_dir, chat_data, tmp_path):
    import yaml

    def config(out):
        cfg = _cfg(vl_dir, chat_data, out, train={"max_steps": 12, "save_steps": 4, "logging_steps": 1,
                                                   "learning_rate": 1e-3})  # fmt: skip
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def losses(out):
        state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    cmd = [sys.executable, "-m", "ernie45", "train"]
    whole = tmp_path / "whole"
    subprocess.run([*cmd, str(config(whole))], check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(config(killed))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-12").exists()
    for later in ("checkpoint-8", "checkpoint-12"):  # a kill during a save leaves a folder without the rest
        (killed / later).mkdir(exist_ok=True)
        (killed / later / "model.safetensors").write_bytes(b"half")
    r = subprocess.run([*cmd, str(config(killed)), "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "checkpoint-8, checkpoint-12 cut short" in r.stderr, r.stderr[-2000:]
    assert losses(killed) == losses(whole) and len(losses(whole)) == 12


def test_precomputed_reference_gradient_checkpointing_and_freezing(vl_dir, chat_data, tmp_path):
    records = [json.loads(x) for x in (chat_data / "dpo.jsonl").read_text().splitlines()]
    for r in records:
        r.update(ref_chosen_logp=-20.0, ref_rejected_logp=-20.0)
    (tmp_path / "dpo_ref.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    cfg = _cfg(vl_dir, chat_data, tmp_path / "out", data={"train": [str(tmp_path / "dpo_ref.jsonl")], "kind": "dpo"},
               dpo={"beta": 0.5, "reference": "precomputed"}, freeze=["vision", "router", "embeddings"],
               train={"max_steps": 2, "logging_steps": 1, "gradient_checkpointing": True, "bf16": True})  # fmt: skip
    trainer = build_trainer(cfg)
    frozen = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    assert any("vision_tower" in k for k in frozen) and any(k.endswith("gate.weight") for k in frozen)
    trainer.train()
    assert all(torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in frozen.items())
    assert [h for h in trainer.state.log_history if "dpo_margin" in h]


def test_plain_transformers_trainer_trains_an_ernie45_model(vl_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = ernie45.load(vl_dir)
    tok = ernie45.load_processor(vl_dir).tokenizer
    rows = [{"input_ids": ids, "labels": ids} for ids in (tok.encode(t) for t in ["Hello world", "ERNIE is a model"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=1, report_to=[],
                             use_cpu=True, logging_steps=1, disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()


def test_encoder_lr_scale_slows_only_the_media_encoders(vl_dir, chat_data, tmp_path):
    trainer = build_trainer(_cfg(vl_dir, chat_data, tmp_path, train={"max_steps": 1, "encoder_lr_scale": 0.1}))
    opt = trainer.create_optimizer()
    by_lr = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            by_lr[names[id(p)]] = g["lr"]
    base = trainer.args.learning_rate
    assert by_lr["model.vision_tower.patch_embed.proj.weight"] == pytest.approx(0.1 * base)
    assert by_lr["model.resampler_model.mlp.weight"] == pytest.approx(0.1 * base)
    assert by_lr["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(base)


def test_encoder_freeze_steps_hold_the_encoders_then_release_them(vl_dir, chat_data, tmp_path):
    train = {"max_steps": 3, "encoder_freeze_steps": 2, "encoder_lr_scale": 0.5, "weight_decay": 0.1}
    trainer = build_trainer(_cfg(vl_dir, chat_data, tmp_path, train=train))
    weights = dict(trainer.model.named_parameters())
    vit = weights["model.vision_tower.patch_embed.proj.weight"]
    trunk = weights["model.layers.0.self_attn.q_proj.weight"]
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((vit.detach().clone(), trunk.detach().clone()))

    start = (vit.detach().clone(), trunk.detach().clone())
    trainer.add_callback(Watch())
    trainer.train()
    assert torch.equal(seen[1][0], start[0])  # 2 steps: the encoder did not move (no update, no decay)
    assert not torch.equal(seen[0][1], start[1])  # while the trunk learned from the first step
    assert not torch.equal(seen[2][0], seen[1][0])  # step 3: the encoder trains at its scaled rate
    torch.save(trainer.lr_scheduler.state_dict(), tmp_path / "scheduler.pt")  # resumable: the Trainer reloads
    torch.load(tmp_path / "scheduler.pt", weights_only=True)  # its scheduler with weights_only=True


def test_gradient_accumulation_gives_the_full_batch_loss_and_gradients(vl_dir, chat_data, tmp_path):
    """One step of 4 samples at once, or of 4 accumulated micro-batches of 1: the same logged loss and the same
    gradients (the loss is normalised by the step's target count, `num_items_in_batch`), not 4x."""

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def step(batch: int, accum: int):
        cfg = _cfg(vl_dir, chat_data, tmp_path / f"ga{accum}", data={"pack": False},
                   train={"max_steps": 1, "batch_size": batch, "grad_accum": accum, "logging_steps": 1,
                          "max_grad_norm": 1e9},
                   losses={"load_balance": 0.0, "z_loss": 0.0, "orthogonal": 0.0, "bias_update_rate": 0.0})  # fmt: skip
        trainer = build_trainer(cfg)
        grads = Grads()
        trainer.add_callback(grads)
        trainer.train()
        return next(h["loss"] for h in trainer.state.log_history if "loss" in h), grads.grads

    (whole, g1), (accumulated, g4) = step(4, 1), step(1, 4)
    assert abs(whole - accumulated) < 1e-3 * whole, (whole, accumulated)
    assert g1.keys() == g4.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=2e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base_trains_only_the_adapters(vl_dir, chat_data, tmp_path, bits):
    """`model.quantize` holds the frozen base (its linears and routed experts) as int8 / int4 codes; LoRA adapters
    on the attention, shared experts and each routed expert's quantized matrices learn through it (the gradient
    reaches them through the quantized layers), the codes never change, and the run writes the adapters, which
    `ernie45 merge` folds into the float base: each expert's weight moves by exactly its adapter's product, and the
    merged model answers like the trained one, not like the base."""
    from ernie45.runtime.quant import QuantLinear
    from ernie45.train import run
    from ernie45.train.lora_merge import merge_adapters

    cfg = _cfg(vl_dir, chat_data, tmp_path / "out", model={"path": str(vl_dir), "quantize": {"bits": bits}},
               lora={"r": 8, "alpha": 16, "targets": ["attention", "shared_experts", "experts"]},
               train={"max_steps": 30, "learning_rate": 5e-3})  # fmt: skip
    trainer = build_trainer(cfg)
    quantized = [m for m in trainer.model.modules() if isinstance(m, QuantLinear)]
    codes = {id(m): m.qweight.clone() for m in quantized}
    assert len(quantized) >= (10 if bits == 8 else 3)  # int4 tiles only widths that are multiples of 32
    adapted = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A." in n}
    quantized_experts = bits == 8  # (this tiny model's expert widths take no int4 tiles: they stay float)
    assert any(".q_gate_up." in n for n in adapted) == quantized_experts
    assert any(".q_down." in n for n in adapted) == quantized_experts
    trainer.train()
    losses = [h["lm_loss"] for h in trainer.state.log_history if "lm_loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(m.qweight, codes[id(m)]) for m in quantized)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    final = run(cfg)
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    merged, base = merge_adapters(vl_dir, final, torch.float32), ernie45.load(vl_dir, dtype=torch.float32)
    weights = load_file(final / "adapter_model.safetensors")
    if quantized_experts:
        key = next(k for k in weights if ".q_gate_up.1.lora_A." in k)
        group = key.split(".q_gate_up.")[0].removeprefix("base_model.model.")
        delta = 2.0 * weights[key.replace("lora_A", "lora_B")].float() @ weights[key].float()  # alpha / r = 2
        moved = merged.get_parameter(f"{group}.gate_up_proj")[1] - base.get_parameter(f"{group}.gate_up_proj")[1]
        torch.testing.assert_close(moved, delta, rtol=1e-4, atol=1e-6)
    ids = torch.tensor([[1, 30, 31, 32, 33, 34, 35, 36]])
    trained = trainer.model.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        off_merged = (merged(input_ids=ids).logits - want).abs().mean()
        off_base = (base(input_ids=ids).logits - want).abs().mean()
    assert off_merged < 0.5 * off_base, (off_merged, off_base)
    if quantized_experts:  # the command: the same merge, written with the run's tokenizer; a bad path in one line
        cmd = [sys.executable, "-m", "ernie45", "merge", str(vl_dir), str(final), str(tmp_path / "merged")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        written = ernie45.load(tmp_path / "merged", dtype=torch.float32)
        with torch.no_grad():
            assert (written(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 0.05
        bad = subprocess.run([*cmd[:4], str(tmp_path / "nowhere"), str(final), str(tmp_path / "m2")],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert bad.returncode != 0 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(ValueError, match="add a `lora` section"):
        build_trainer(_cfg(vl_dir, chat_data, tmp_path / "x", model={"path": str(vl_dir), "quantize": 4}))


def test_reinit_draws_the_trunk_afresh_and_keeps_the_trained_encoders(vl_dir, chat_data, tmp_path):
    """`model.reinit: [trunk]` under a loaded checkpoint: every decoder weight is a new draw (norms at 1),
    the ViT and resampler are the checkpoint's own; a misspelt part or a quantized base is refused."""
    loaded = dict(ernie45.load(vl_dir).named_parameters())
    trainer = build_trainer(_cfg(vl_dir, chat_data, tmp_path, model={"reinit": ["trunk"]}))
    now = dict(trainer.model.named_parameters())
    encoders = [n for n in now if ".vision_tower." in n or ".resampler_model." in n]
    trunk = [n for n in now if n not in encoders]
    assert encoders and all(torch.equal(now[n], loaded[n]) for n in encoders)
    drawn = [n for n in trunk if not n.endswith(("norm.weight", "correction_bias"))]  # the rest: constants
    assert len(drawn) > 10 and not any(torch.equal(now[n], loaded[n]) for n in drawn)
    assert all(torch.all(now[n] == 1) for n in trunk if n.endswith("norm.weight"))
    again = dict(build_trainer(_cfg(vl_dir, chat_data, tmp_path, model={"reinit": ["trunk"]})).model.named_parameters())
    assert all(torch.equal(again[n], now[n]) for n in trunk)  # drawn from the recipe's seed
    with pytest.raises(ValueError, match="model.reinit: a list of parts to draw afresh, from \\['trunk'\\]"):
        build_trainer(_cfg(vl_dir, chat_data, tmp_path, model={"reinit": "trunk"}))
    with pytest.raises(ValueError, match="model.reinit draws weights afresh to train them; a quantized base"):
        build_trainer(_cfg(vl_dir, chat_data, tmp_path, model={"reinit": ["trunk"], "quantize": 8}, lora={"r": 4}))
    from ernie45.train.recipe import DEFAULTS, build_model, merge

    zero3 = merge(DEFAULTS, _cfg(vl_dir, chat_data, tmp_path, model={"reinit": ["trunk"]}))
    with pytest.raises(ValueError, match="model.reinit draws whole weights; under DeepSpeed ZeRO-3"):
        build_model(zero3, zero3={"zero_optimization": {"stage": 3}})  # refused before any weight is read
