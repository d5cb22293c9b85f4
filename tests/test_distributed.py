"""Training past one process (issue #30): two CPU processes (gloo, launched by torchrun) against one.

A step over two samples is one step over both whichever way they are split, so the loss and the gradients
must match one process's; the aux-loss-free correction bias must stay identical on every rank; the final model
is written once, by the main process, and loads.
"""

from __future__ import annotations

import json
import os
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
    # what this rank holds once the model is built, before the Trainer starts (ZeRO-3: partitioned as it was read)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in trainer.model.parameters())
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.model.parameters())
    grads = Grads()
    trainer.add_callback(grads)
    trainer.train()
    if os.environ.get("SAVE_FINAL"):  # through the recipe's own save (`ernie45 train` ends the same way)
        from ernie45.train.recipe import save_final
        save_final(trainer)
    def whole(t):  # under ZeRO-3 a parameter is a partition outside forward: gathered to be read
        if hasattr(t, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([t]):
                return t.detach().clone().tolist()
        return t.tolist()

    bias = {f"{k[0]}.{k[1]}": whole(r.e_score_correction_bias) for k, r in routers(trainer.model).items()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.save({"grads": grads.grads, "bias": bias, "losses": losses, "held": held, "total": total},
               f"{out}/rank{rank}.pt")
""")


# every launched script ends by leaving the process group: a gloo group torn down by the interpreter's exit instead
# aborts now and then ("terminate called without an active exception", SIGABRT after all the work was done)
LEAVE = textwrap.dedent("""
    import torch.distributed as _dist
    if _dist.is_available() and _dist.is_initialized():
        _dist.barrier()
        _dist.destroy_process_group()
""")


def _write(path, script: str) -> None:
    path.write_text(script + LEAVE)


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
    _write(root / "run.py", SCRIPT)
    return root, model


def _cfg(root, model, out, batch: int, steps: int) -> dict:
    return {"model": {"path": str(model)},
            "data": {"train": [str(root / "chat.jsonl")], "max_tokens": 128, "pack": False},
            "train": {"output_dir": str(out), "max_steps": steps, "learning_rate": 1e-3, "batch_size": batch,
                      "save_steps": 1000, "logging_steps": 1, "disable_tqdm": True, "warmup_steps": 0,
                      "lr_scheduler": "constant", "max_grad_norm": 1e9},
            "losses": {"bias_update_rate": 0.01}}  # fmt: skip


def _launch(root, cfg: dict, out, procs: int, save: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), str(root / "run.py"), json.dumps(cfg), str(out)]
    env = {**os.environ, **({"SAVE_FINAL": "1"} if save else {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
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
    """A VL model (text and vision expert groups) with gradient checkpointing, on text only: the vision group's
    parameters get no gradient, which DDP must be told to expect."""
    import yaml

    root, _ = setup
    model = write_chat_checkpoint(tmp_path / "vl", vision=True)
    cfg = _cfg(root, model, tmp_path / "out", batch=1, steps=2)
    cfg["train"]["gradient_checkpointing"] = True
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "ernie45", "train", str(recipe)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained model written to") == 1
    assert ernie45.load(tmp_path / "out" / "final").config.num_hidden_layers >= 1
    with pytest.raises(ValueError, match="falls back to DDP on CPU"):  # not a silent fallback
        from ernie45.train import build_trainer

        build_trainer({**_cfg(root, model, tmp_path / "o3", 1, 1), "train": {"fsdp": "full_shard"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_cfg(root, model, tmp_path / "o2", 1, 1), "train": {"fsdp_confg": {}}}))
    r = subprocess.run([sys.executable, "-m", "ernie45", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown train keys ['fsdp_confg']" in r.stderr and "Traceback" not in r.stderr


def test_twenty_ddp_steps_with_the_moe_losses_on_equal_one_process(setup, tmp_path):
    """20 optimizer steps, load balance 1.0 and z-loss on: 2 DDP ranks (one row each) log one process's losses
    (both rows at once) within 1e-5, and end with the same correction bias on both ranks."""
    root, model = setup

    def cfg(out, batch):
        c = _cfg(root, model, out, batch=batch, steps=20)
        c["losses"].update(load_balance=1.0, z_loss=0.01)
        return c

    (one,) = _launch(root, cfg(tmp_path / "one", 2), tmp_path / "one", 1)
    two = _launch(root, cfg(tmp_path / "two", 1), tmp_path / "two", 2)
    assert len(two[0]["losses"]) == len(one["losses"]) == 20
    for a, b in zip(two[0]["losses"], one["losses"], strict=True):
        assert abs(a - b) < 1e-5 * b, (two[0]["losses"], one["losses"])
    assert two[0]["bias"] == two[1]["bias"] and any(any(v) for v in two[0]["bias"].values())


def _zero_cfg(root, model, out, batch, stage=None) -> dict:
    c = _cfg(root, model, out, batch=batch, steps=20)
    c["losses"].update(load_balance=1.0, z_loss=0.01)
    if stage:
        c["train"]["deepspeed"] = {"zero_optimization": {"stage": stage}, "train_batch_size": "auto",
                                   "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                   "gradient_clipping": "auto"}  # fmt: skip
    return c


@pytest.fixture(scope="module")
def one_process_twenty_steps(setup, tmp_path_factory):
    root, model = setup
    out = tmp_path_factory.mktemp("one")
    (one,) = _launch(root, _zero_cfg(root, model, out, 2), out, 1)
    return one


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process_and_writes_a_model_that_loads(setup, tmp_path, stage,
                                                                              one_process_twenty_steps):  # fmt: skip
    """ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator over gloo, 2 ranks) against one process: the same losses with
    the load-balance and z-losses on (under ZeRO-3 they were dropped without a word), the same correction bias on
    both ranks, each layer partitioned as it was read (ZeRO-3), and a final model written by the recipe's save that
    loads with the trained weights (ZeRO-3 wrote every tensor with shape [0])."""
    pytest.importorskip("deepspeed")
    root, model = setup
    one = one_process_twenty_steps
    zero = _launch(root, _zero_cfg(root, model, tmp_path, 1, stage), tmp_path, 2, save=True)
    assert len(zero[0]["losses"]) == len(one["losses"]) == 20
    for a, b in zip(zero[0]["losses"], one["losses"], strict=True):
        assert abs(a - b) < 1e-5 * b, (zero[0]["losses"], one["losses"])
    assert zero[0]["bias"] == zero[1]["bias"] and any(any(v) for v in zero[0]["bias"].values())
    for rank in zero:  # ZeRO-3: the load partitioned each layer as it read it; no rank built a whole copy
        assert rank["total"] == one["total"] == one["held"]
        assert rank["held"] <= 0.55 * rank["total"] if stage == 3 else rank["held"] == rank["total"]
    trained = ernie45.load(tmp_path / "final").float()
    base = ernie45.load(model).float()
    ids = torch.randint(20, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moved = (trained(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert trained.model.embed_tokens.weight.shape == base.model.embed_tokens.weight.shape and 0 < moved < 50


FSDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import ernie45
    from ernie45.train.losses import BiasBalancer, cross_entropy, moe_losses, routers

    model_dir, out, shard = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    files, read = sys.modules["ernie45.checkpoint.files"], [0]  # elements read from the checkpoint
    real_read = files.SafetensorsFile.read
    def counted(self, key, out=None, rows=None):
        t = real_read(self, key, out, rows)
        read[0] += t.numel()
        return t
    files.SafetensorsFile.read = counted
    whole = []  # at each layer's sharding: how many decoder layers hold whole (unsharded, real) weights
    if shard:  # FSDP2 by the load itself: every decoder layer its own unit as soon as it is read, then the root
        import torch.distributed as dist
        import torch.distributed.fsdp as fsdp
        from torch.distributed.tensor import DTensor
        dist.init_process_group("gloo")
        load_module, built, real = sys.modules["ernie45.checkpoint.load"], [], fsdp.fully_shard
        meta_build = load_module.build_on_meta
        load_module.build_on_meta = lambda c: built.append(meta_build(c)) or built[-1]
        def watched(module, *a, **k):
            whole.append(sum(any(not isinstance(p, DTensor) and not p.is_meta for p in layer.parameters())
                             for layer in built[-1].model.layers))
            return real(module, *a, **k)
        fsdp.fully_shard = watched
        model = ernie45.load(model_dir, dtype=torch.float32, fsdp=True).train()
    else:
        model = ernie45.load(model_dir).float().train()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 200, (2, 24), generator=g)  # every rank the same batch: one process's numbers
    out_ = model(input_ids=ids, output_router_logits=True)
    parts = moe_losses(model, out_.router_logits)
    loss = cross_entropy(out_.logits, ids) + sum(1.0 * v for v in parts.values())
    loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None}
    balancer = BiasBalancer(0.01)
    balancer.accumulate(out_.router_logits)
    balancer.step(model)
    bias = {k: (r.e_score_correction_bias.full_tensor() if hasattr(r.e_score_correction_bias, "full_tensor")
                else r.e_score_correction_bias).clone() for k, r in routers(model).items()}
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"loss": loss.detach(), "parts": {k: v.detach() for k, v in parts.items()}, "grads": grads,
                "bias": bias, "whole": whole, "local": local, "read": read[0], "layers": len(model.model.layers)},
               f"{out}/fsdp{int(shard)}-{rank}.pt")
""")


def test_fsdp2_keeps_the_moe_losses_and_the_bias_update(setup, tmp_path):
    """Under FSDP2 (fully_shard per decoder layer) the router weights outside the forward are shards: the MoE
    losses come from the forward's records, the bias update adds each rank's part. Loss (with load balance,
    z-loss and orthogonality at weight 1), gradients and the updated bias equal one unsharded process's. The
    sharded model comes from `ernie45.load(..., fsdp=True)`: every layer is sharded on the meta device before any
    weight is read and each rank reads and fills only its rows, so no rank ever holds a whole decoder layer, and each
    rank reads about half the checkpoint and ends with half the weights."""
    root, model = setup
    script = tmp_path / "fsdp.py"
    _write(script, FSDP_SCRIPT)
    base = [str(script), str(model), str(tmp_path)]
    for cmd in (
        [sys.executable, *base, "0"],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base, "1"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "fsdp0-0.pt"), [torch.load(tmp_path / f"fsdp1-{i}.pt") for i in range(2)]
    assert set(one["parts"]) == {"load_balance", "z_loss", "orthogonal"} and float(one["parts"]["orthogonal"]) > 0
    for got in two:
        torch.testing.assert_close(got["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == one["grads"].keys()
        for name, g in one["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        for key, b in one["bias"].items():
            torch.testing.assert_close(got["bias"][key], b)
    assert any(b.abs().sum() > 0 for b in one["bias"].values())
    for got in two:
        assert got["whole"] == [0] * (got["layers"] + 1), got["whole"]  # every layer, then the root: none whole
        assert got["local"] <= 0.52 * one["local"], (got["local"], one["local"])
        assert got["read"] <= 0.52 * one["read"], (got["read"], one["read"])  # nor reads another rank's rows


def test_router_records_survive_hooks_that_rebuild_the_forwards_arguments(setup):
    """DeepSpeed ZeRO-3's pre-forward hooks hand each layer copies of its arguments; the MoE losses must still see
    every layer's routing (they were silently dropped when records only travelled through the argument list)."""
    _, model_dir = setup
    model = ernie45.load(model_dir).float()
    ids = torch.randint(20, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    plain = model(input_ids=ids, output_router_logits=True).router_logits

    def copy_lists(module, args, kwargs):  # as ZeRO-3 does, on every module: new lists, new dicts
        copy = lambda a: list(a) if isinstance(a, list) else a  # noqa: E731
        return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(copy_lists, with_kwargs=True) for m in model.modules()]
    hooked = model(input_ids=ids, output_router_logits=True).router_logits
    for h in handles:
        h.remove()
    assert len(plain) >= 1 and [(r.layer, r.group) for r in hooked] == [(r.layer, r.group) for r in plain]
    torch.testing.assert_close(hooked[0].logits, plain[0].logits)
    assert all(getattr(layer.mlp, "records", None) is None for layer in model.model.layers)  # nothing kept after
    assert model.model.layers.records is None
    direct: list = []  # the base model called alone fills the caller's list, as its signature says
    model.model(input_ids=ids, router_out=direct)
    assert [(r.layer, r.group) for r in direct] == [(r.layer, r.group) for r in plain]


TP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from transformers import DistributedConfig
    import ernie45
    from ernie45.model import Ernie45ForConditionalGeneration

    ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for d in sys.argv[2:]:
        tp = Ernie45ForConditionalGeneration.from_pretrained(
            d, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32)
        with torch.no_grad():
            got = tp(input_ids=ids).logits
            want = ernie45.load(d).float()(input_ids=ids).logits
        sharded = type(tp.model.layers[0].self_attn.q_proj.weight).__name__
        with open(f"{sys.argv[1]}/tp-{os.environ['RANK']}-{os.path.basename(d)}", "w") as f:
            f.write(f"{sharded} {float((got - want).abs().max())}")
""")


HF_EP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from transformers import DistributedConfig
    import ernie45
    from ernie45.model import Ernie45ForConditionalGeneration

    for d in sys.argv[2:]:
        config = DistributedConfig(tp_size=2, ep_size=2)  # the ranks share one batch: attention split too
        ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(0))
        ep = Ernie45ForConditionalGeneration.from_pretrained(d, distributed_config=config, dtype=torch.float32)
        with torch.no_grad():
            got = ep(input_ids=ids).logits
            want = ernie45.load(d).float()(input_ids=ids).logits
        groups = [m for n, m in ep.named_modules() if n.endswith(("groups.text", "groups.vision"))]
        held = sum(m.gate_up_proj.to_local().shape[0] for m in groups)
        total = sum(m.gate.weight.shape[0] for m in groups)
        with open(f"{sys.argv[1]}/hfep-{os.environ['RANK']}-{os.path.basename(d)}", "w") as f:
            f.write(f"{held} {total} {float((got - want).abs().max())}")
""")


# ep_size > tp_size: the ranks are data-parallel (FSDP) and each holds its own batch, whose tokens go to the
# experts of both ranks and come back (all-to-all)
HF_EP_FSDP_SCRIPT = HF_EP_SCRIPT.replace(
    "DistributedConfig(tp_size=2, ep_size=2)", "DistributedConfig(fsdp_size=2, tp_size=1, ep_size=2)"
).replace("manual_seed(0)", "manual_seed(int(os.environ['RANK']))")


def test_transformers_expert_parallel_config_matches_one_process(setup, tmp_path):
    """`from_pretrained(..., distributed_config=DistributedConfig(tp_size=2, ep_size=2))` under torchrun:
    transformers splits each routed group's stacked experts over 2 ranks (`base_model_ep_plan`) and its token
    dispatch runs them; logits equal the unsplit model's, for a text MoE and a VL model (both groups split)."""
    for where, (held, total, diff) in _on_two_ranks(HF_EP_SCRIPT, "hfep", tmp_path, setup[1]).items():
        assert 2 * int(held) == int(total) and float(diff) < 1e-4, (where, held, total, diff)


def test_expert_parallel_over_ranks_with_their_own_batches_matches_one_process(setup, tmp_path):
    """`DistributedConfig(fsdp_size=2, tp_size=1, ep_size=2)`: ep_size > tp_size, so each rank holds its own batch
    and half of every routed group's experts (FSDP shards the rest, the router with its group: the router gathers
    its weight itself); each rank's logits equal one unsplit process's on that rank's batch."""
    for where, (held, total, diff) in _on_two_ranks(HF_EP_FSDP_SCRIPT, "hfep", tmp_path, setup[1]).items():
        assert 2 * int(held) == int(total) and float(diff) < 1e-4, (where, held, total, diff)


def _on_two_ranks(script: str, name: str, tmp_path, model) -> dict[tuple[int, str], list[str]]:
    """Run `script` under torchrun on 2 ranks over `model` and a VL checkpoint; (rank, checkpoint) -> the words
    each rank wrote to `{name}-{rank}-{checkpoint}`."""
    vl = write_chat_checkpoint(tmp_path / "vl", vision=True)
    path = tmp_path / f"{name}.py"
    _write(path, script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path),
           str(tmp_path), str(model), str(vl)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {(rank, d.name): (tmp_path / f"{name}-{rank}-{d.name}").read_text().split()
            for rank in (0, 1) for d in (model, vl)}  # fmt: skip


def test_tensor_parallel_from_pretrained_matches_one_process(setup, tmp_path):
    """`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun: attention and
    the dense / shared FFNs split over 2 ranks (DTensor weights), logits equal to the unsplit model's."""
    for where, (kind, diff) in _on_two_ranks(TP_SCRIPT, "tp", tmp_path, setup[1]).items():
        assert kind == "DTensor" and float(diff) < 1e-4, (where, kind, diff)


EP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import ernie45
    from ernie45.runtime.expert_parallel import LocalExperts, shard_experts

    dist.init_process_group("gloo")
    ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for d in sys.argv[2:]:
        whole = ernie45.load(d).float()
        with torch.no_grad():
            want = whole(input_ids=ids).logits
        model = ernie45.load(d).float()
        groups = shard_experts(model)
        held = [m.gate_up_proj.shape[0] for m in model.modules() if isinstance(m, LocalExperts)]
        total = [m.num_experts for m in model.modules() if isinstance(m, LocalExperts)]
        split = ernie45.load(d, expert_shard=True).float()  # built on meta, only this rank's experts read
        split_held = [m.gate_up_proj.shape[0] for m in split.modules() if isinstance(m, LocalExperts)]
        with torch.no_grad():
            got = model(input_ids=ids).logits
            got_split = split(input_ids=ids).logits
        with open(f"{sys.argv[1]}/ep-{os.environ['RANK']}-{os.path.basename(d)}", "w") as f:
            f.write(f"{groups} {sum(held)} {sum(total)} {float((got - want).abs().max())} {sum(split_held)} "
                    f"{float((got_split - want).abs().max())}")
""")


def test_expert_parallel_inference_holds_half_the_experts_and_matches_one_process(setup, tmp_path):
    """`shard_experts` under torchrun (2 ranks): each rank keeps half of every routed group's experts, runs the
    token-expert pairs it holds, and the summed outputs give one process's logits (a text MoE, and a VL model
    whose text and vision groups both split); the same when the split is made by the loader, before reading."""
    runs = _on_two_ranks(EP_SCRIPT, "ep", tmp_path, setup[1])
    for where, (groups, held, total, diff, split_held, split_diff) in runs.items():
        assert int(groups) >= 1 and 2 * int(held) == int(total), (where, groups, held, total)
        assert float(diff) < 1e-5, (where, diff)
        # `ernie45.load(DIR, expert_shard=True)`: the same split made before reading (no whole model first)
        assert split_held == held and float(split_diff) < 1e-5, (where, split_held, split_diff)


def test_a_split_load_reads_only_this_rank_s_experts_in_every_layout(setup, tmp_path):
    """`load(..., expert_shard=(rank, ranks))` without a process group: each rank's experts equal its slice of the
    whole model's, from ernie45's stacked layout and from the official per-expert layout (whose other experts are
    never read: every tensor read is counted)."""
    from ernie45.checkpoint import files
    from ernie45.runtime.expert_parallel import LocalExperts

    vl = write_chat_checkpoint(tmp_path / "vl", vision=True)
    whole = ernie45.load(vl)
    params = dict(whole.named_parameters())
    official = tmp_path / "official"
    ernie45.export(whole, official)
    read_keys: list[str] = []
    real = files.iter_tensors

    def counting(*args, **kwargs):
        for key, dtype, shape, read in real(*args, **kwargs):
            yield key, dtype, shape, lambda *a, _k=key, _r=read: (read_keys.append(_k), _r(*a))[1]

    loader = sys.modules["ernie45.checkpoint.load"]  # (the package's `load` is the function)
    for src in (vl, official):
        for rank in (0, 1):
            read_keys.clear()
            loader.iter_tensors = counting
            try:
                model = ernie45.load(src, expert_shard=(rank, 2))
            finally:
                loader.iter_tensors = real
            parts = [(n, m) for n, m in model.named_modules() if isinstance(m, LocalExperts)]
            assert parts
            for name, m in parts:
                for attr in ("gate_up_proj", "down_proj"):
                    want = params[f"{name}.{attr}"][rank * m.held : (rank + 1) * m.held]
                    assert torch.equal(getattr(m, attr), want), (src.name, name, attr)
            if src == official:  # per-expert keys: the other rank's experts are skipped unread
                mine, offset = set(), 0
                for g in whole.config.expert_groups:
                    half = g["num_experts"] // 2
                    mine |= set(range(offset + rank * half, offset + (rank + 1) * half))
                    offset += g["num_experts"]
                read = {int(k.split(".experts.")[1].split(".")[0]) for k in read_keys if ".experts." in k}
                assert read == mine, (rank, sorted(read), sorted(mine))
    with pytest.raises(ValueError, match="rank 2 is not one of 2 ranks"):
        ernie45.load(vl, expert_shard=(2, 2))
    with pytest.raises(ValueError, match="no process group"):
        ernie45.load(vl, expert_shard=True)
    with pytest.raises(ValueError, match="fsdp=True: no process group"):
        ernie45.load(vl, fsdp=True)
    with pytest.raises(ValueError, match="does not combine with on_layer"):
        ernie45.load(vl, fsdp=True, expert_shard=(0, 2))
