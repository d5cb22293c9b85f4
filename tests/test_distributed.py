"""Training past one process (issue #30): two CPU processes (gloo, launched by torchrun) against one.

A step over two samples is one step over both whichever way they are split, so the loss and the gradients
must match one process's; the aux-loss-free correction bias must stay identical on every rank; the final model
is written once, by the main process, and loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from chat_fixtures import write_chat_checkpoint

import ernie45

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from transformers import TrainerCallback
    from ernie45.train import build_trainer
    from ernie45.train.losses import routers

    cfg, out = json.loads(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))

    class Grads(TrainerCallback):
        grads = None
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.grads is None:  # the first step's, after DDP's all-reduce
                self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trainer = build_trainer(cfg)
    grads = Grads()
    trainer.add_callback(grads)
    trainer.train()
    bias = {f"{k[0]}.{k[1]}": r.e_score_correction_bias.tolist() for k, r in routers(trainer.model).items()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.save({"grads": grads.grads, "bias": bias, "losses": losses}, f"{out}/rank{rank}.pt")
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = write_chat_checkpoint(root / "model", vision=False)
    rows = [("Say alpha.", "alpha " * 9), ("Say beta.", "beta")]  # 2 samples of very different lengths
    (root / "chat.jsonl").write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]})
            for q, a in rows
        )
        + "\n"
    )
    (root / "run.py").write_text(SCRIPT)
    return root, model


def _cfg(root, model, out, batch: int, steps: int) -> dict:
    return {"model": {"path": str(model)},
            "data": {"train": [str(root / "chat.jsonl")], "max_tokens": 128, "pack": False},
            "train": {"output_dir": str(out), "max_steps": steps, "learning_rate": 1e-3, "batch_size": batch,
                      "save_steps": 1000, "logging_steps": 1, "disable_tqdm": True, "warmup_steps": 0,
                      "lr_scheduler": "constant", "max_grad_norm": 1e9},
            "losses": {"bias_update_rate": 0.01}}  # fmt: skip


def _launch(root, cfg: dict, out, procs: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), str(root / "run.py"), json.dumps(cfg), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(procs)]


def test_two_ranks_step_like_one_process_and_route_alike(setup, tmp_path):
    root, model = setup
    (one,) = _launch(root, _cfg(root, model, tmp_path / "one", batch=2, steps=1), tmp_path / "one", 1)
    two = _launch(root, _cfg(root, model, tmp_path / "two", batch=1, steps=1), tmp_path / "two", 2)
    assert abs(two[0]["losses"][0] - one["losses"][0]) < 1e-3 * one["losses"][0]  # per token, not per rank
    for name, g in one["grads"].items():
        torch.testing.assert_close(two[0]["grads"][name.replace("module.", "")] if name in two[0]["grads"] else
                                   two[0]["grads"]["module." + name], g, rtol=2e-3, atol=1e-6, msg=name)  # fmt: skip
    longer = _launch(root, _cfg(root, model, tmp_path / "bias", batch=1, steps=4), tmp_path / "bias", 2)
    assert longer[0]["bias"] == longer[1]["bias"]  # the same routing on every replica
    assert any(any(v) for v in longer[0]["bias"].values())  # and the update did run


def test_the_train_command_under_torchrun_writes_one_final_model(setup, tmp_path):
    import yaml

    root, model = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_cfg(root, model, tmp_path / "out", batch=1, steps=2)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "ernie45", "train", str(recipe)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained model written to") == 1
    assert ernie45.load(tmp_path / "out" / "final").config.num_hidden_layers >= 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_cfg(root, model, tmp_path / "o2", 1, 1), "train": {"fsdp_confg": {}}}))
    r = subprocess.run([sys.executable, "-m", "ernie45", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown train keys ['fsdp_confg']" in r.stderr and "Traceback" not in r.stderr
