"""GGUF export for llama.cpp (issue #31): the file read back with gguf-py's reader has the architecture's
tensor names and metadata, the weights (exact in f32, within the block error in q8_0 / q4_0), the experts
stacked per layer, the SentencePiece vocabulary padded to the embedding's rows, and the special ids."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from chat_fixtures import EXTRA, tiny_chat_config, write_spm_tokenizer

from ernie45.checkpoint.export import official_tensors
from ernie45.model import Ernie45ForConditionalGeneration

gguf = pytest.importorskip("gguf")


def _checkpoint(path, moe: bool):
    write_spm_tokenizer(path)
    torch.manual_seed(0)
    over = dict(hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=False)
    if moe:
        over["expert_groups"] = [dict(name="text", num_experts=4, intermediate_size=32, modalities=[0, 1, 2, 3])]
        over["moe_shared_intermediate_size"] = 32
    else:
        over["expert_groups"] = []
    model = Ernie45ForConditionalGeneration(tiny_chat_config(400 + len(EXTRA), **over))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("moe", [False, True])
def test_gguf_round_trip(tmp_path, moe):
    from ernie45.checkpoint.gguf_export import export_gguf

    model = _checkpoint(tmp_path / "ckpt", moe)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(out)
    arch = "ernie4_5-moe" if moe else "ernie4_5"
    fields = reader.fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert value("general.architecture") == arch
    assert value(f"{arch}.block_count") == 2 and value(f"{arch}.embedding_length") == 64
    assert value(f"{arch}.attention.head_count_kv") == 2
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
                "blk.1.attn_output.weight", "blk.0.ffn_norm.weight"}  # fmt: skip
    assert expected <= set(tensors)
    ours = dict(official_tensors(model))
    q = ours["model.layers.1.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.shape), q)
    if moe:
        assert value(f"{arch}.expert_count") == 4 and value(f"{arch}.expert_used_count") == 2
        gate = np.asarray(tensors["blk.1.ffn_gate_exps.weight"].data)
        want = np.stack([ours[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].numpy() for e in range(4)])
        assert np.array_equal(gate.reshape(want.shape), want)
        assert "blk.1.ffn_gate_inp.weight" in tensors and "blk.1.exp_probs_b.bias" in tensors
        assert "blk.1.ffn_up_shexp.weight" in tensors
    vocab = value("tokenizer.ggml.tokens")
    assert len(vocab) == model.config.vocab_size and value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.ggml.eos_token_id") == 2
    assert "<|IMAGE_START|>" in vocab  # the added special tokens keep their ids


def test_quantized_types_and_the_command(tmp_path):
    _checkpoint(tmp_path / "ckpt", True)
    cmd = [sys.executable, "-m", "ernie45", "export", str(tmp_path / "ckpt"), str(tmp_path / "q.gguf"),
           "--format", "gguf", "--type", "q8_0"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "GGUF, q8_0" in r.stdout, r.stderr[-2000:]
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    from ernie45.checkpoint import load

    want = load(tmp_path / "ckpt").model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(back.reshape(want.shape) - want).max() < 0.02 * np.abs(want).max()
    bad = subprocess.run([sys.executable, "-m", "ernie45", "export", str(tmp_path / "ckpt"), str(tmp_path / "x"),
                          "--type", "q4_0"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "--type applies to --format gguf" in bad.stderr and "Traceback" not in bad.stderr
