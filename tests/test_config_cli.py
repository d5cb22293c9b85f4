"""The one config, the presets, and the `ernie45 info` / `ernie45 export` commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import ernie45
from ernie45 import ConfigError, presets
from ernie45.checkpoint import build_on_meta
from ernie45.model.stats import parameter_counts
from ernie45.official_config import config_from_dict, to_official


def _counts(name):
    return parameter_counts(build_on_meta(presets.get(name)))


def test_preset_parameter_counts():
    total, active = _counts("ernie-4.5-0.3b")
    assert 0.35e9 < total < 0.37e9 and active == total
    total, active = _counts("ernie-4.5-21b-a3b")
    assert 21.7e9 < total < 21.9e9 and 3.2e9 < active < 3.4e9
    total, active = _counts("ernie-4.5-8b-omni")
    assert 7.2e9 < total < 8.8e9 and active < 1.5e9  # about 8B (+-10%) with its vision and audio encoders
    model = build_on_meta(presets.get("ernie-4.5-8b-omni"))
    assert set(model.model.layers[1].mlp.groups) == {"text", "vision", "audio"}
    assert model.config.max_position_embeddings == 131072 and model.config.moe_k == 8


def test_moe_layer_rule_and_derived_fields():
    c = ernie45.Ernie45Config(
        num_hidden_layers=6,
        hidden_size=64,
        num_attention_heads=4,
        moe_layer_start_index=1,
        moe_layer_interval=2,
        moe_num_shared_experts=2,
        moe_k=2,
        expert_groups=[dict(name="text", num_experts=4, intermediate_size=8, modalities=[0])],
    )
    assert [c.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    assert c.head_dim == 16 and c.moe_shared_intermediate_size == 16 and c.moe_layer_end_index == 5
    with pytest.raises(ConfigError, match="moe_k"):
        ernie45.Ernie45Config(
            moe_k=6, expert_groups=[dict(name="t", num_experts=4, intermediate_size=8, modalities=[0])]
        )


def test_official_config_roundtrip_and_unknown_type():
    official = dict(
        model_type="ernie4_5_moe",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=128,
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
        moe_layer_end_index=-1,
        rope_theta=10000,
        vocab_size=100,
    )
    c = config_from_dict(official)
    assert c.rope_theta == 10000 and c.expert_groups[0]["num_experts"] == 8 and c.moe_layer_end_index == 3
    back = to_official(c)
    assert back["model_type"] == "ernie4_5_moe" and back["moe_intermediate_size"] == 16
    assert config_from_dict(back).to_dict()["expert_groups"] == c.to_dict()["expert_groups"]
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        config_from_dict({"model_type": "llama"})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ernie45.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_prints_structure_and_counts():
    r = _cli("info", "ernie-4.5-21b-a3b")
    assert r.returncode == 0, r.stderr
    assert re.search(r"21\.8\dB total, 3\.3\dB active", r.stdout)
    assert "MoE 1-27" in r.stdout and "64 x width 1536, top-6" in r.stdout


def test_info_vl_shows_encoder_groups_and_total():
    r = _cli("info", "ernie-4.5-vl-28b-a3b")
    assert r.returncode == 0, r.stderr
    assert "vision        ViT 32 x 1280" in r.stdout
    assert "vision: 64 x width 512, top-6 (tokens: image,video)" in r.stdout
    assert re.search(r"29\.40B total, 3\.35B active", r.stdout)  # transformers' own count of this config


def test_info_and_export_errors_are_one_line(tmp_path):
    r = _cli("info", "no-such-model")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a preset" in r.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = _cli("export", str(tmp_path), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model_type 'gpt2'" in r.stderr


def test_export_command_writes_official_layout(ref_moe_dir, tmp_path):
    r = _cli("export", str(ref_moe_dir), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out/config.json").read_text())["model_type"] == "ernie4_5_moe"
    r = _cli("info", str(tmp_path / "out"))
    assert r.returncode == 0 and "8 x width 24, top-3" in r.stdout


BAD_SIZES = [
    ("hidden_size", -256),
    ("hidden_size", "256"),
    ("hidden_size", 256.5),
    ("num_attention_heads", 0),
    ("num_hidden_layers", 1_000_000),
    ("rms_norm_eps", "small"),
]


def test_a_config_with_bad_sizes_is_one_line_at_once(tmp_path):
    """Each bad size is one line naming the field, at once (no model is built first); the cases run side by side."""
    import time

    procs = []
    for i, (field, value) in enumerate(BAD_SIZES):
        config = to_official(presets.get("ernie-4.5-0.3b"))
        config[field] = value
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "ernie45.cli", "info", str(tmp_path / str(i))],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    started = time.perf_counter()
    for (field, value), proc in zip(BAD_SIZES, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err and field in err, (field, value, err[-500:])
        assert err.strip().count("\n") == 0
    assert time.perf_counter() - started < 90
