"""The VL variant in the one trunk, against transformers' Ernie4_5_VLMoeForConditionalGeneration."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, VID, make_reference_vl, reference_vl_kwargs, vl_batch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, DynamicCache

import ernie45
from ernie45.model.layers import rope_cos_sin
from ernie45.model.positions import rope_index
from ernie45.model.vision import VisionConfig, VisionTransformer

TOL = 1e-4


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


@pytest.fixture(scope="module")
def ref():
    return make_reference_vl()


@pytest.fixture(scope="module")
def expected(ref):
    return _logits(ref, **reference_vl_kwargs(vl_batch()))


def test_vl_batch_matches_reference(ref_vl_dir, expected):
    ours = ernie45.load(ref_vl_dir)
    assert ours.model.vision_tower is not None and set(ours.model.layers[1].mlp.groups) == {"text", "vision"}
    batch = vl_batch()
    real = batch["attention_mask"].bool()
    got = _logits(ours, **batch)  # modality ids derived from the token ids
    assert (got[real] - expected[real]).abs().max() <= TOL
    # the same batch with transformers' own type ids also runs on ours
    got2 = _logits(ours, **reference_vl_kwargs(batch))
    assert (got2[real] - expected[real]).abs().max() <= TOL


def test_media_and_routing_really_matter(ref_vl_dir, expected):
    ours = ernie45.load(ref_vl_dir)
    batch = vl_batch()
    real = batch["attention_mask"].bool()
    other_pixels = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    assert (_logits(ours, **other_pixels)[real] - expected[real]).abs().max() > 1e-3
    all_text = dict(batch, moe_mm_token_type_ids=torch.zeros_like(batch["input_ids"]))
    assert (_logits(ours, **all_text)[real] - expected[real]).abs().max() > 1e-3


def test_vl_export_loads_in_reference(ref_vl_dir, tmp_path, expected):
    ours = ernie45.load(ref_vl_dir)
    ernie45.export(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ernie4_5_vl_moe"
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "Ernie4_5_VLMoeForConditionalGeneration"
    batch = vl_batch()
    real = batch["attention_mask"].bool()
    assert (_logits(theirs, **reference_vl_kwargs(batch))[real] - expected[real]).abs().max() <= TOL


def test_vl_transformers5_layout_and_original_flat_config(ref, ref_vl_dir, tmp_path, expected):
    batch = vl_batch()
    real = batch["attention_mask"].bool()
    hf5 = tmp_path / "hf5"
    hf5.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "model.language_model.layers.1.mlp.vision_moe.experts.gate_up_proj" in state
    save_file(state, hf5 / "model.safetensors")
    ref.config.save_pretrained(hf5)
    assert (_logits(ernie45.load(hf5), **batch)[real] - expected[real]).abs().max() <= TOL

    flat = tmp_path / "flat"  # the original remote-code config form, with the -PT weights
    flat.mkdir()
    (flat / "model.safetensors").write_bytes((ref_vl_dir / "model.safetensors").read_bytes())
    t = json.loads((ref_vl_dir / "config.json").read_text())["text_config"]
    original = dict(
        model_type="ernie4_5_moe_vl",
        vocab_size=t["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        moe_num_experts=[6, 6],
        moe_intermediate_size=[16, 8],
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=[1, 1],
        moe_layer_end_index=[4, 3],
        freq_allocation=4,
        spatial_conv_size=2,
        temporal_conv_size=2,
        tie_word_embeddings=True,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14),
    )
    (flat / "config.json").write_text(json.dumps(original))
    assert (_logits(ernie45.load(flat), **batch)[real] - expected[real]).abs().max() <= TOL


def test_decoding_after_media_continues_from_max_plus_one(ref_vl_dir):
    ours = ernie45.load(ref_vl_dir)
    batch = vl_batch()
    extra = torch.randint(3, 1000, (2, 3), generator=torch.Generator().manual_seed(5))
    full_ids = torch.cat([batch["input_ids"], extra], 1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1)
    full = _logits(ours, **dict(batch, input_ids=full_ids, attention_mask=full_mask))
    cache = DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(**batch, cache=cache)
        width = batch["input_ids"].shape[1]
        steps = [
            ours(input_ids=extra[:, i : i + 1], attention_mask=full_mask[:, : width + i + 1], cache=cache).logits
            for i in range(3)
        ]
    assert (torch.cat(steps, 1) - full[:, width:]).abs().max() <= TOL


def test_rope_index_follows_max_plus_one():
    grid = [1, 4, 6]  # merged 2 x 3
    ids = torch.tensor([[5, 6, IMG, IMG, IMG, IMG, IMG, IMG, 7]])
    pos, delta = rope_index(ids, {IMG: ([grid], 1)}, merge=2)
    assert pos[:, 0, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 0, 2:8].tolist() == [2] * 6  # t
    assert pos[1, 0, 2:8].tolist() == [2, 2, 2, 3, 3, 3]  # h
    assert pos[2, 0, 2:8].tolist() == [2, 3, 4, 2, 3, 4]  # w
    assert pos[:, 0, 8].tolist() == [5, 5, 5] and delta.tolist() == [6 - 9]
    # a long video advances by its frame pairs too (transformers' max(h, w) rule would not)
    vid = torch.tensor([[VID] * 8 + [9]])
    pos, _ = rope_index(vid, {VID: ([[8, 2, 4]], 2)}, merge=2)
    assert pos[:, 0, -1].tolist() == [4, 4, 4]


def test_3d_rope_of_text_equals_1d_rope():
    pos = torch.arange(7)[None]
    a = rope_cos_sin(pos, 16, 500000.0)
    b = rope_cos_sin(pos[None].expand(3, -1, -1), 16, 500000.0, t_pairs=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_vision_attention_stays_inside_each_frame():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)).eval()
    for p in vit.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    pixels = torch.randn(2 * 16, 588)
    with torch.no_grad():
        video = vit(pixels, torch.tensor([[2, 4, 4]]))
        frame0 = vit(pixels[:16], torch.tensor([[1, 4, 4]]))
        frame1 = vit(pixels[16:], torch.tensor([[1, 4, 4]]))
        joint = vit(pixels, torch.tensor([[1, 8, 4]]))  # one bigger image: attends across
    assert torch.allclose(video, torch.cat([frame0, frame1]), atol=1e-5)
    assert not torch.allclose(joint[:16], frame0, atol=1e-3)


def test_placeholder_count_mismatch_is_a_clear_error(ref_vl_dir):
    ours = ernie45.load(ref_vl_dir)
    batch = vl_batch()
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == VID, 7)
    with pytest.raises(ValueError, match="0 video placeholder tokens .* give 12 features"):
        ours(**batch)
