"""The trunk against transformers' reference models: logits, loss, padding, KV cache."""

from __future__ import annotations

import torch
from conftest import make_reference_dense, make_reference_moe
from transformers import DynamicCache

import ernie45

TOL = 1e-4


def _ids(batch=2, seq=13, seed=1, vocab=160):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dense_matches_reference(ref_dense_dir):
    ref = make_reference_dense()
    ours = ernie45.load(ref_dense_dir)
    ids = _ids()
    assert (_logits(ref, ids) - _logits(ours, ids)).abs().max() <= TOL


def test_moe_matches_reference_and_bias_only_steers_selection(ref_moe_dir):
    ref = make_reference_moe()
    ours = ernie45.load(ref_moe_dir)
    assert not ours.config.is_moe_layer(0) and ours.config.is_moe_layer(1)
    ids = _ids(seq=31)
    expected = _logits(ref, ids)
    got = _logits(ours, ids)
    assert (expected - got).abs().max() <= TOL
    # the correction bias must matter (it changes which experts win) ...
    with torch.no_grad():
        for layer in ours.model.layers[1:]:
            layer.mlp.groups["text"].gate.e_score_correction_bias.zero_()
    assert (_logits(ours, ids) - expected).abs().max() > 1e-3


def test_loss_matches_reference(ref_moe_dir):
    ref = make_reference_moe()
    ours = ernie45.load(ref_moe_dir)
    ids = _ids()
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        assert abs(ref(ids, labels=labels).loss - ours(ids, labels=labels).loss) <= TOL


def test_left_padded_batch_equals_each_row_alone(ref_moe_dir):
    ours = ernie45.load(ref_moe_dir)
    rows = [_ids(1, 9, seed=2)[0], _ids(1, 5, seed=3)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = _logits(ours, ids, attention_mask=mask, position_ids=position_ids)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        alone = _logits(ours, r[None])[0]
        assert (batched[i, width - len(r) :] - alone).abs().max() <= TOL
    # the reference agrees on the real tokens of the padded batch
    ref = make_reference_moe()
    ref_batched = _logits(ref, ids, attention_mask=mask, position_ids=position_ids)
    assert (ref_batched[mask.bool()] - batched[mask.bool()]).abs().max() <= TOL


def test_incremental_decoding_with_cache_equals_full_forward(ref_moe_dir):
    ours = ernie45.load(ref_moe_dir)
    ids = _ids(2, 12)
    full = _logits(ours, ids)
    cache = DynamicCache(config=ours.config)
    with torch.no_grad():
        first = ours(ids[:, :8], cache=cache, use_cache=True).logits
        steps = [ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(8, 12)]
    got = torch.cat([first, *steps], dim=1)
    assert (got - full).abs().max() <= TOL
    assert cache.get_seq_length() == 12


def test_gradients_flow_to_experts_and_router(ref_moe_dir):
    ours = ernie45.load(ref_moe_dir).train()
    ids = _ids()
    ours(ids, labels=ids).loss.backward()
    group = ours.model.layers[1].mlp.groups["text"]
    assert group.gate_up_proj.grad.abs().sum() > 0
    assert group.gate.weight.grad.abs().sum() > 0
    assert group.gate.e_score_correction_bias.grad is None  # adjusted by the balancing rule, not by gradient


def test_decode_expert_paths_agree_in_bf16_and_fp32():
    """A decode step's few (token, expert) pairs: gathered weights in fp32, one matmul per expert hit in bf16 on
    CPU (the gathered bf16 einsum is pathologically slow there); both compute the same mixture."""
    from ernie45.model.moe import ExpertGroup

    torch.manual_seed(0)
    group = ExpertGroup(64, 8, 32, 2, 1e-12).eval()
    torch.nn.init.normal_(group.gate_up_proj, std=0.1)
    torch.nn.init.normal_(group.down_proj, std=0.1)
    x, ids, w = torch.randn(3, 64), torch.tensor([[0, 5], [5, 7], [2, 0]]), torch.rand(3, 2)
    with torch.inference_mode():
        want = group.experts(x, ids, w)  # fp32: the gather path
        got = group.to(torch.bfloat16).experts(x.bfloat16(), ids, w).float()
    assert (got - want).norm() / want.norm() < 0.02


def test_fused_projections_give_the_same_logits_and_decode(ref_moe_dir):
    """q/k/v and gate/up fused into one linear each (what the engine does to its own models): same numbers,
    prefill and cached decode, with a left-padded batch."""
    from ernie45.runtime.prepare import fuse_projections

    plain, fused = ernie45.load(ref_moe_dir), ernie45.load(ref_moe_dir)
    n = fuse_projections(fused)
    layers = plain.config.num_hidden_layers
    assert n >= layers + 1  # every attention, and the dense MLP / shared experts
    assert fuse_projections(fused) == 0  # twice is once
    keys = " ".join(fused.state_dict())
    assert "qkv_proj" in keys and "q_proj" not in keys and "gate_up_proj.weight" in keys
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for model in (plain, fused):
        model.eval()
    assert (_logits(fused, ids, attention_mask=mask) - _logits(plain, ids, attention_mask=mask)).abs().max() <= 1e-5
    caches = [DynamicCache(config=plain.config) for _ in range(2)]
    with torch.no_grad():
        outs = []
        for model, cache in zip((plain, fused), caches, strict=True):
            model(ids[:, :7], attention_mask=mask[:, :7], cache=cache, use_cache=True)
            outs.append(model(ids[:, 7:8], attention_mask=mask[:, :8], cache=cache, use_cache=True).logits)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_one_query_attention_matches_sdpa():
    """The fp32 CPU decode attention (two grouped matmuls) against SDPA, with GQA and a padding mask."""
    import torch.nn.functional as F

    from ernie45.runtime.fused import _one_query_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 37, 16), torch.randn(2, 2, 37, 16)
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[1, ..., :5] = False
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25, enable_gqa=True)
        got = _one_query_attention(q, k, v, m, 0.25)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5
    # the masked row ignores what it may not see: changing those keys changes nothing
    k2 = k.clone()
    k2[1, :, :5] += 100
    assert torch.allclose(_one_query_attention(q, k2, v, mask, 0.25)[1], _one_query_attention(q, k, v, mask, 0.25)[1])
