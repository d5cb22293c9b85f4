"""Loading every supported layout, writing ours and the official one, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_reference_dense, make_reference_moe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ernie45
from ernie45 import CheckpointError

TOL = 1e-4
IDS = torch.randint(3, 160, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Apply edit(dict of tensors) to path/model.safetensors."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_reads_transformers5_stacked_layout_and_rope_parameters(tmp_path):
    ref = make_reference_moe()
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"},
        tmp_path / "model.safetensors",
    )
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in ref.state_dict())
    ref.config.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    assert (_logits(ernie45.load(tmp_path)) - _logits(ref)).abs().max() <= TOL


def test_reads_hub_style_config_with_rope_theta(ref_dense_dir, tmp_path):
    path = _copy(ref_dense_dir, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=10000.0, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(cfg))
    model = ernie45.load(path)
    assert model.config.rope_theta == 10000.0
    assert model.dtype == torch.float32  # stored as fp32; the config's dtype is only a hint
    theta_10k = make_reference_dense(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert (_logits(model) - _logits(theta_10k)).abs().max() <= TOL


@pytest.mark.parametrize("maker", [make_reference_dense, make_reference_moe])
def test_export_loads_in_reference_and_roundtrips(maker, tmp_path):
    ref = maker()
    ref.save_pretrained(tmp_path / "ref")
    ours = ernie45.load(tmp_path / "ref")
    ernie45.export(ours, tmp_path / "official")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "official").eval()
    assert type(theirs).__name__ == type(ref).__name__
    assert (_logits(theirs) - _logits(ref)).abs().max() <= TOL
    # the exported file has exactly the keys the reference itself writes
    assert set(load_file(tmp_path / "official/model.safetensors")) == set(load_file(tmp_path / "ref/model.safetensors"))


def test_save_pretrained_writes_ernie45_layout_readable_by_auto(ref_moe_dir, tmp_path):
    ours = ernie45.load(ref_moe_dir)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ernie45"
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.groups.text.gate_up_proj" in keys
    expected = _logits(ours)
    assert (_logits(ernie45.load(tmp_path)) - expected).abs().max() <= TOL
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, ernie45.Ernie45ForConditionalGeneration)
    assert (_logits(auto) - expected).abs().max() <= TOL


def test_sharded_export_with_index_loads(ref_moe_dir, tmp_path):
    ernie45.export(ref_moe_dir, tmp_path, shard_size_gb=40_000 / 2**30)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (_logits(ernie45.load(tmp_path)) - _logits(make_reference_moe())).abs().max() <= TOL


def test_bf16_load_keeps_router_fp32(ref_moe_dir):
    model = ernie45.load(ref_moe_dir, dtype=torch.bfloat16)
    group = model.model.layers[1].mlp.groups["text"]
    assert group.gate.weight.dtype == torch.float32 and group.gate.e_score_correction_bias.dtype == torch.float32
    assert group.gate_up_proj.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert (_logits(model).float() - _logits(make_reference_moe())).abs().max() < 0.1


def test_missing_key_names_key_and_shape(ref_moe_dir, tmp_path):
    path = _copy(ref_moe_dir, tmp_path / "c")
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"partly missing weight for model\.layers\.2\.mlp\.groups\.text"
        r"\.gate_up_proj \[8, 48, 48\]",
    ):
        ernie45.load(path)
    _rewrite(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight for model\.norm\.weight \[48\]"):
        ernie45.load(path)


def test_unexpected_and_misshapen_keys_are_errors(ref_moe_dir, tmp_path):
    path = _copy(ref_moe_dir, tmp_path / "c")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.0\.self_attn\.q_norm\.weight"):
        ernie45.load(path)
    path = _copy(ref_moe_dir, tmp_path / "d")
    _rewrite(path, lambda t: t.update({"model.layers.1.mlp.experts.2.down_proj.weight": torch.ones(48, 20)}))
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight: shape \[48, 20\], expected \[48, 24\]"):
        ernie45.load(path)


def test_mtp_weights_are_kept_aside_and_exported(ref_moe_dir, tmp_path):
    path = _copy(ref_moe_dir, tmp_path / "c")
    mtp = {"model.mtp_emb_norm.0.weight": torch.rand(48), "model.mtp_linear_proj.0.weight": torch.rand(48, 96)}
    _rewrite(path, lambda t: t.update(mtp))
    model = ernie45.load(path)
    assert set(model.mtp_state_dict) == set(mtp)
    assert (_logits(model) - _logits(make_reference_moe())).abs().max() <= TOL
    ernie45.export(model, tmp_path / "out")
    written = load_file(tmp_path / "out/model.safetensors")
    assert torch.equal(written["model.mtp_linear_proj.0.weight"], mtp["model.mtp_linear_proj.0.weight"])


def test_pickle_checkpoints_need_allow_pickle(ref_dense_dir, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(ref_dense_dir / "config.json", path)
    torch.save(load_file(ref_dense_dir / "model.safetensors"), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        ernie45.load(path)
    model = ernie45.load(path, allow_pickle=True)
    assert (_logits(model) - _logits(make_reference_dense())).abs().max() <= TOL


def test_corrupt_and_absent_files_give_clear_errors(ref_dense_dir, tmp_path):
    path = _copy(ref_dense_dir, tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a safetensors file|corrupt"):
        ernie45.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        ernie45.load(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        ernie45.load(tmp_path / "nowhere")


@pytest.mark.parametrize("header, words", [
    ([1, 2], "not an object"),
    ({"w": 5}, "not an object"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "invalid shape"),
    ({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
])  # fmt: skip
def test_malformed_safetensors_headers_are_one_clear_error(ref_dense_dir, tmp_path, header, words):
    import struct

    path = _copy(ref_dense_dir, tmp_path / "c")
    raw = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match=words):
        ernie45.load(path)


def test_a_shard_index_cannot_name_a_file_outside_the_checkpoint(ref_dense_dir, tmp_path):
    path = _copy(ref_dense_dir, tmp_path / "c")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a file name"):
        ernie45.load(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match="weight_map"):
        ernie45.load(path)


def test_files_written_by_several_processes_at_once_are_never_read_half_written(tmp_path):
    """The ranks of a run all write the tokenizer's config.json (the recipe, the demo's tokenizer); with
    `written_atomically` a reader sees the old file or the new one, whole (4 of ~28 two-rank launches used to die
    with JSONDecodeError)."""
    import json
    import multiprocessing as mp

    from ernie45.checkpoint.files import written_atomically

    ctx = mp.get_context("fork")
    stop = ctx.Event()
    writers = [ctx.Process(target=_write_often, args=(tmp_path, stop, i)) for i in range(2)]
    for w in writers:
        w.start()
    seen = set()
    try:
        for _ in range(3000):
            try:
                text = (tmp_path / "config.json").read_text()
            except FileNotFoundError:
                continue
            seen.add(json.loads(text)["writer"])  # raises on a half-written file
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert seen == {0, 1}
    with written_atomically(tmp_path) as tmp:
        (tmp / "config.json").write_text('{"writer": 9}')
    assert json.loads((tmp_path / "config.json").read_text()) == {"writer": 9}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind


def _write_often(out, stop, i):
    from ernie45.checkpoint.files import written_atomically

    big = "x" * 200_000  # long enough that a plain write is caught half-done
    while not stop.is_set():
        with written_atomically(out) as tmp:
            (tmp / "config.json").write_text(f'{{"writer": {i}, "pad": "{big}"}}')
