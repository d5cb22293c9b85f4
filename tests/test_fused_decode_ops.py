"""The fused CPU decode ops (`kernels.rmsnorm`, `silu_mul`, `decode_attention`) against the torch code they
replace, and the model's choice between them."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from ernie45.model.layers import RMSNorm, SwiGLU
from ernie45.runtime import kernels
from ernie45.runtime.kv_cache import KVCache


class PlainCache(KVCache):
    """A cache that does not hand out its buffers (not a `FusedCache`): the layer-by-layer path runs."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def update(self, k, v, layer_idx):
        return self.inner.update(k, v, layer_idx)

    def get_seq_length(self, layer_idx=0):
        return self.inner.get_seq_length(layer_idx)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def built_kernels():
    if kernels.kernel() is None:
        pytest.skip("no AVX512-BF16 CPU or no C++ compiler here: the model keeps torch's ops")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_the_eager_norm(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x = (torch.randn(2, 3, 96) * 5).to(dtype)
    with torch.no_grad():
        with kernels.switched(False):
            want = norm(x)
        got = kernels.rmsnorm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.bfloat16:  # the same roundings: equal but for a rare last-bit tie
        assert (got != want).float().mean() < 0.01
    assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_silu_times_up_including_tails_and_extremes(dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 2 * 41) * 6).to(dtype)  # 41: not a multiple of the 16-lane vectors
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 0.0, 120.0]).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernels.silu_mul(gate_up)
    want = F.silu(gate) * up
    assert got.dtype == dtype and got.shape == (3, 41)
    assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "dim"),
    [(1, 16, 2, 300, 128), (3, 6, 3, 17, 32), (1, 20, 4, 16, 128), (2, 5, 5, 5, 64)],
)  # query heads per KV head 8, 2, 5 (21B-A3B), 1; keys in whole blocks of 16, with a tail, or fewer than 16
def test_decode_attention_matches_sdpa_on_cache_views_with_a_mask(dtype, batch, heads, kv_heads, length, dim):
    torch.manual_seed(0)
    buf_k, buf_v = (torch.randn(batch, kv_heads, length + 9, dim).to(dtype) for _ in range(2))
    k, v = buf_k[:, :, :length], buf_v[:, :, :length]  # a cache's first positions: not contiguous
    q = torch.randn(batch, heads, 1, dim).to(dtype)
    mask = torch.rand(batch, 1, 1, length) > 0.4
    mask[..., -1] = True
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for m in (None, mask, mask[:1]):  # none, per row, one row broadcast
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, scale=0.3, enable_gqa=True)
        got = kernels.decode_attention(q, k, v, m, 0.3)
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (got.float() - want).abs().max()
    garbage = buf_v.clone()  # a masked position's cache slot may hold anything: it must not reach the output
    garbage[:, :, :length].masked_fill_(~mask.view(batch, 1, length, 1), float("nan"))
    got = kernels.decode_attention(q, k, garbage[:, :, :length], mask, 0.3)
    assert torch.equal(got, kernels.decode_attention(q, k, v, mask, 0.3))


def test_the_fused_ops_stay_out_of_autograd_and_follow_the_switch():
    x = torch.randn(2, 8, requires_grad=True)
    assert not kernels.fused(x)  # training needs torch's ops for the backward
    with torch.no_grad():
        assert kernels.fused(x)
        with kernels.switched(False):
            assert not kernels.fused(x)
    assert not kernels.fused(torch.zeros(2, dtype=torch.float16))
    from ernie45.runtime.fused import FusedSwiGLU

    mlp = FusedSwiGLU.from_plain(SwiGLU(32, 48))  # as fuse_projections leaves it
    y = torch.randn(4, 32)
    y.requires_grad_(True)
    mlp(y).sum().backward()  # the eager path: gradients flow
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_the_complex_rotation_on_a_strided_view(dtype):
    from ernie45.model.layers import apply_interleaved_rope, rope_cos_sin

    torch.manual_seed(0)
    qkv = torch.randn(2, 1, 7, 64).to(dtype).transpose(1, 2)  # [B, heads, S, D] as Attention.project views it
    x = qkv[:, :5]
    cos, sin = rope_cos_sin(torch.tensor([[3], [11]]), 64, 10000.0)
    with kernels.switched(False):
        want = apply_interleaved_rope(x, cos, sin)
    got = kernels.rope(x, cos, sin)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert not kernels.fused(torch.zeros(512, 1024))  # prefill-sized: torch's multi-threaded ops


def _tiny_fast_model(kind: str, dense: bool, mtp: bool = False):
    """A tiny random model (3 dense layers, or a dense layer then MoE layers; with an MTP block if `mtp`) as the
    engine runs it: projections fused, bf16 linears packed or int4 / int8 codes, the fast modules swapped in."""
    from chat_fixtures import tiny_chat_config

    from ernie45.model.trunk import Ernie45ForConditionalGeneration
    from ernie45.runtime.packed import pack_bf16_linears
    from ernie45.runtime.prepare import fuse_projections, use_fast_modules
    from ernie45.runtime.quant import quantize

    torch.manual_seed(0)
    layout = {"num_hidden_layers": 3, "moe_layer_start_index": 3} if dense else {"moe_layer_start_index": 1}
    config = tiny_chat_config(300, hidden_size=64, intermediate_size=128, head_dim=32, **layout)
    kind, _, activations = kind.partition("-")  # int4-bf16: int4 weights, bf16 activations (a quantized 21B)
    dtype = torch.bfloat16 if "bf16" in (kind, activations) else torch.float32
    model = Ernie45ForConditionalGeneration(config).eval().to(dtype).requires_grad_(False)
    if mtp:
        from ernie45.model.mtp import with_mtp

        model = with_mtp(model).requires_grad_(False)
    fuse_projections(model)
    if kind == "bf16":
        assert pack_bf16_linears(model) > 0
    if kind in ("int4", "int8"):
        if not kernels.ready(kind):
            pytest.skip(f"no AVX512-VBMI / VNNI here: {kind} layers run op by op on torch's kernels")
        quantize(model, bits=int(kind[3:]))
    use_fast_modules(model)
    return model, config


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int4", "int8", "int4-bf16", "int8-bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dense", [False, True])
def test_fused_decode_layers_give_the_eager_steps_numbers(kind, batch, dense):
    """A decode step's attention half and dense MLP half as one call each (`Attention.decode_block`,
    `SwiGLU.decode_block`), and a dense stack's step as one call (`dense_stack`): the same logits as the
    layer-by-layer eager step, through a padded batch's mask."""
    from ernie45.engine.cache import StaticKVCache

    model, config = _tiny_fast_model(kind, dense)
    ids = torch.randint(3, 300, (batch, 7))
    padding = torch.ones(batch, 9, dtype=torch.long)
    padding[-1, :2] = 0  # the last row left-padded (a no-op mask for one row)
    calls = []
    block, stack = kernels.attention_block, kernels.dense_stack

    def counted(*args, **kwargs):
        calls.append("layer")
        return block(*args, **kwargs)

    def counted_stack(*args, **kwargs):
        calls.append("stack")
        return stack(*args, **kwargs)

    def steps(fused: bool) -> torch.Tensor:
        cache = StaticKVCache.for_model(model, batch, 16)
        if not fused:
            cache = PlainCache(cache)  # a cache that does not hand out its buffers: the eager layers run
        out = [model(input_ids=ids[:, :5], cache=cache, attention_mask=padding[:, :5]).logits[:, -1]]
        for t in range(5, 7):
            mask = padding[:, : t + 1]
            pos = (mask.cumsum(-1) - 1)[:, -1:]
            step = model(input_ids=ids[:, t : t + 1], cache=cache, attention_mask=mask, position_ids=pos)
            out.append(step.logits[:, -1])
        return torch.stack(out)

    with torch.inference_mode():
        want = steps(False)
        kernels.attention_block, kernels.dense_stack = counted, counted_stack
        try:
            got = steps(True)
        finally:
            kernels.attention_block, kernels.dense_stack = block, stack
    # two decode steps: a dense stack in one call each, else through every layer's fused call
    assert calls == (["stack"] * 2 if dense else ["layer"] * 2 * config.num_hidden_layers)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int4", "int8", "int4-bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("vision", [False, True])
def test_fused_moe_decode_gives_the_module_numbers(kind, batch, vision):
    """A MoE layer's decode half as one call (`MoEBlock.decode_block`): router, the picked experts' weighted
    sum and the shared experts give the module's numbers, bit for bit with bf16 activations (fp32 ones may differ in
    the last bit: a int8 row did, at one row as at three); a row routed by another group (an image token of a VL
    model) keeps the module path."""
    from chat_fixtures import tiny_chat_config

    from ernie45.model.moe import MoEBlock
    from ernie45.model.trunk import Ernie45ForConditionalGeneration
    from ernie45.runtime.packed import pack_bf16_linears
    from ernie45.runtime.prepare import fuse_projections, use_fast_modules
    from ernie45.runtime.quant import quantize

    kind, _, activations = kind.partition("-")  # int4-bf16: int4 experts, bf16 activations (a quantized 21B)
    if kind not in ("fp32", "bf16") and not kernels.ready(kind):
        pytest.skip(f"no AVX512-VBMI / VNNI here: {kind} experts run on torch's kernels")
    torch.manual_seed(0)
    wide = 2 if kind == "int8" else 1  # (the int8 kernel reads widths of 64 columns)
    text_modalities = [0, 3] if vision else [0, 1, 2, 3]
    groups = [dict(name="text", num_experts=6, intermediate_size=32 * wide, modalities=text_modalities)]
    if vision:
        groups.append(dict(name="vision", num_experts=4, intermediate_size=64 * wide, modalities=[1, 2]))
    config = tiny_chat_config(300, hidden_size=64, head_dim=32, moe_layer_start_index=1, expert_groups=groups, moe_k=3)
    dtype = torch.bfloat16 if "bf16" in (kind, activations) else torch.float32
    model = Ernie45ForConditionalGeneration(config).eval().to(dtype).requires_grad_(False)
    fuse_projections(model)
    if kind == "bf16":
        assert pack_bf16_linears(model) > 0
    elif kind != "fp32":
        quantize(model, bits=int(kind[3:]))
    use_fast_modules(model)
    block, norm = next((m.mlp, m.post_attention_layernorm) for m in model.model.layers if isinstance(m.mlp, MoEBlock))
    for group in block.groups.values():  # the correction bias steers selection away from the top probabilities
        group.gate.e_score_correction_bias.normal_(0, 0.3)
    h = torch.randn(batch, 1, 64).to(dtype) * 4
    text = torch.zeros(batch, 1, dtype=torch.long)
    with torch.inference_mode():
        for modality in (None, text):
            got = block.decode_block(h, norm, modality)
            assert got is not None, "the fused MoE call should take text decode rows"
            want = h + block(norm(h), modality)
            exact = dtype == torch.bfloat16
            assert torch.equal(got, want) if exact else torch.allclose(got, want, atol=1e-6, rtol=1e-6)
        image = text.clone()
        image[-1] = 1
        assert (block.decode_block(h, norm, image) is None) == vision
    assert block.decode_block(h.clone().requires_grad_(True), norm) is None  # autograd must see the module's ops


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("dense", [False, True])
def test_a_short_continuation_takes_one_decode_call_a_layer(kind, dense):
    """A speculative verify (the last token and its drafts after a cached prompt, one forward) runs through one
    decode call a layer, the tokens as its rows: the logits of decoding those tokens one at a time, which greedy
    speculation must reproduce, and close to the generic path's."""
    from ernie45.engine.cache import StaticKVCache

    model, config = _tiny_fast_model(kind, dense)
    ids = torch.randint(3, 300, (1, 9))
    calls, block = [], kernels.attention_block

    def counted(*args, **kwargs):
        calls.append(1)
        return block(*args, **kwargs)

    def run(cache, one_by_one: bool) -> torch.Tensor:
        model(input_ids=ids[:, :5], cache=cache, attention_mask=torch.ones(1, 5, dtype=torch.long))
        if one_by_one:
            steps = [model(input_ids=ids[:, t : t + 1], cache=cache, attention_mask=torch.ones(1, t + 1,
                                                                                             dtype=torch.long))
                     for t in range(5, 9)]  # fmt: skip
            return torch.cat([s.logits[0, -1:] for s in steps])
        out = model(input_ids=ids[:, 5:], cache=cache, attention_mask=torch.ones(1, 9, dtype=torch.long))
        assert cache.get_seq_length(0) == 9
        return out.logits[0]

    with torch.inference_mode():
        stepped = run(StaticKVCache.for_model(model, 1, 16), True)
        kernels.attention_block = counted
        try:
            calls.clear()  # (the prompt's prefill makes no decode call)
            together = run(StaticKVCache.for_model(model, 1, 16), False)
        finally:
            kernels.attention_block = block
        generic = run(PlainCache(StaticKVCache.for_model(model, 1, 16)), False)
    assert len(calls) == config.num_hidden_layers  # the four tokens through each layer's decode call at once
    # bf16: bit for bit; fp32's MLP over several rows rounds a sum in another order (~1e-7)
    assert torch.equal(together, stepped) if kind == "bf16" else torch.allclose(together, stepped, atol=1e-5)
    tol = 5e-2 if kind == "bf16" else 1e-4
    assert torch.allclose(together.float(), generic.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_the_mtp_block_alone_takes_the_decode_calls_on_its_growing_cache(kind):
    """The MTP block, a decoder layer called alone on the engine's `GrowingKVCache`: a window of positions (the
    generic path), then a one-token step and a two-token step through the decode calls, past the cache's first
    capacity; the same outputs as the block on a plain cache."""
    from ernie45.engine.cache import GrowingKVCache
    from ernie45.model.layers import attention_mask
    from ernie45.model.mtp import mtp_forward

    model, config = _tiny_fast_model(kind, dense=True, mtp=True)
    trunk, dtype = model.model, model.model.embed_tokens.weight.dtype
    calls, block = [], kernels.attention_block

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return block(*args, **kwargs)

    def run(cache) -> list[torch.Tensor]:
        outs, past = [], 0
        for n in (7, 1, 2, 2, 1, 2):
            hidden = torch.randn(1, n, config.hidden_size, generator=torch.Generator().manual_seed(past)).to(dtype)
            ids = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(past + 1))
            pos = torch.arange(past + 1, past + 1 + n)[None]
            mask = attention_mask(None, n, past + n, hidden.device)
            outs.append(mtp_forward(trunk, hidden, trunk.embed_tokens(ids), pos, mask, cache))
            past += n
        return outs

    with torch.inference_mode():
        kernels.attention_block = counted
        try:
            fused = run(GrowingKVCache(config.num_key_value_heads, config.head_dim, dtype, "cpu", capacity=8))
        finally:
            kernels.attention_block = block
        generic = run(PlainCache(GrowingKVCache(config.num_key_value_heads, config.head_dim, dtype, "cpu")))
    assert calls == [1, 2, 2, 1, 2]  # every step after the window through one decode call, its tokens as rows
    tol = 2e-2 if kind == "bf16" else 1e-5
    for a, b in zip(fused, generic, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_the_dense_stack_keeps_its_plan_and_notices_a_swapped_layer():
    """The stack's plan is built once and reused; a linear replaced between steps is seen at the next step (the
    same logits as the eager layers with the same swap)."""
    from chat_fixtures import tiny_chat_config

    from ernie45.engine.cache import StaticKVCache
    from ernie45.model.trunk import Ernie45ForConditionalGeneration
    from ernie45.runtime import decode_stack
    from ernie45.runtime.prepare import fuse_projections, use_fast_modules

    config = tiny_chat_config(300, hidden_size=64, intermediate_size=128, head_dim=32, num_hidden_layers=3,
                              moe_layer_start_index=3)  # fmt: skip
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    builds = []
    build = decode_stack._build

    def counted(*args):
        builds.append(1)
        return build(*args)

    def run(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = Ernie45ForConditionalGeneration(config).eval().requires_grad_(False)
        fuse_projections(model)
        use_fast_modules(model)
        cache = StaticKVCache.for_model(model, 1, 16)
        if not fused:
            cache = PlainCache(cache)
        out = [model(input_ids=ids[:, :5], cache=cache).logits[:, -1]]
        for t in range(5, 9):
            if t == 7:  # a new down projection in the middle layer
                model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 64, bias=False).requires_grad_(False)
            out.append(model(input_ids=ids[:, t : t + 1], cache=cache).logits[:, -1])
        return torch.stack(out)

    decode_stack._build = counted
    try:
        with torch.inference_mode():
            want = run(False)
            builds.clear()
            got = run(True)
    finally:
        decode_stack._build = build
    assert len(builds) == 2  # built at the first decode step, and again after the swap; not at the other two
    assert torch.equal(got, want)
    # the kept plan holds the weights; it must go with the model, not keep a dropped model's weights alive
    model = Ernie45ForConditionalGeneration(config).eval().requires_grad_(False)
    fuse_projections(model)
    use_fast_modules(model)
    cache = StaticKVCache.for_model(model, 1, 16)
    with torch.inference_mode():
        model(input_ids=ids[:, :5], cache=cache)
        model(input_ids=ids[:, 5:6], cache=cache)
    weight = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    del model, cache
    gc.collect()
    assert weight() is None


@pytest.mark.parametrize("dense", [True, False])
def test_served_batches_take_the_fused_decode_with_the_same_answers(tmp_path, dense):
    """Continuous batching's slots hold rows of different lengths; the fused calls write each row at its own
    position (`Slot.write_at`), so `ernie45 serve`'s engine runs the dense-stack step (or the layer halves) and
    answers as `LLM` does for each prompt alone."""
    from chat_fixtures import EXTRA, tiny_chat_config, write_spm_tokenizer

    from ernie45.engine import LLM, SamplingParams
    from ernie45.engine.batcher import BatchEngine
    from ernie45.model.trunk import Ernie45ForConditionalGeneration

    write_spm_tokenizer(tmp_path)
    torch.manual_seed(0)
    layout = {"num_hidden_layers": 3, "moe_layer_start_index": 3} if dense else {"moe_layer_start_index": 1}
    config = tiny_chat_config(400 + len(EXTRA), hidden_size=64, intermediate_size=128, head_dim=32, **layout)
    Ernie45ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[400, 294, 261, 358, 341, 313, 300, 290, 280], [401, 295], [402, 296, 262, 359, 342]]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    calls = []
    stack, block = kernels.dense_stack, kernels.attention_block
    kernels.dense_stack = lambda *a, **k: calls.append("stack") or stack(*a, **k)
    kernels.attention_block = lambda *a, **k: calls.append("layer") or block(*a, **k)
    engine = BatchEngine(llm, max_batch=3, max_len=64)
    try:
        handles = [engine.submit({"input_ids": p}, params) for p in prompts]
        served = [[t for d in h for t in d.token_ids] for h in handles]
    finally:
        engine.shutdown()
        kernels.dense_stack, kernels.attention_block = stack, block
    assert served == alone
    assert calls and set(calls) == ({"stack"} if dense else {"layer"})


def test_the_kernels_are_torch_ops_that_torch_compile_traces():
    """Registered through torch.library: torch.compile traces them as ops (fake shapes), including the attention
    half that writes the KV cache in place (its schema says so), with the eager call's numbers."""
    ops = torch.ops.ernie45
    assert kernels.kernel() is ops
    e, heads, kv, d, length = 64, 4, 2, 16, 8
    norm, h = torch.rand(e) + 0.5, torch.randn(2, 1, e)
    qkv = (torch.randn((heads + 2 * kv) * d, e) / 8, torch.empty(0), 0)
    o = (torch.randn(e, heads * d) / 8, torch.empty(0), 0)
    weights = kernels.attention_weights(norm, 1e-5, qkv, o, d**-0.5)
    cos, sin = torch.rand(2, 1, d // 2), torch.rand(2, 1, d // 2)

    def step(h, kbuf, vbuf):
        x = ops.rmsnorm(h, norm, 1e-5)
        y = ops.gemv_bf16(x.view(2, e).bfloat16(), qkv[0].bfloat16(), False)
        out = ops.attention_block(h, *weights, kbuf, vbuf, cos, sin, 3, torch.empty(0, dtype=torch.bool),
                                  torch.empty(0, dtype=torch.long))  # fmt: skip
        return out, ops.silu_mul(y)

    caches = [torch.zeros(2, kv, length, d) for _ in range(4)]
    eager = step(h, caches[0], caches[1])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(h, caches[2], caches[3])
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert caches[2][:, :, 3].abs().sum() > 0  # the compiled call wrote position 3 of the cache
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_a_kernel_call_lets_other_python_threads_run():
    """The op binding releases the GIL while the C++ runs: another thread's Python keeps going meanwhile (the
    server's event loop answering while the engine computes a step). Held, the other thread would stall for a
    whole call at a time."""
    import threading
    import time

    x, w = torch.randn(1, 1 << 25), torch.ones(1 << 25)
    t = time.perf_counter()
    torch.ops.ernie45.rmsnorm(x, w, 1e-5)
    call = time.perf_counter() - t
    done = threading.Event()

    def work():
        for _ in range(8):
            torch.ops.ernie45.rmsnorm(x, w, 1e-5)
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    last, gap = time.perf_counter(), 0.0
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    thread.join()
    assert call > 0.01, "the call is too short to tell"
    assert gap < call / 2, f"this thread stalled {gap * 1e3:.1f} ms; one call takes {call * 1e3:.1f} ms"


def test_the_prefetch_timing_moves_off_the_vendor_default_only_for_a_clear_and_trustworthy_gain():
    pick = kernels._pick_prefetch
    assert pick({2048: 1.0, 0: 0.95, 4096: 1.05}, 2048) == (2048, "")  # 5%: within a shared host's noise
    assert pick({2048: 1.0, 0: 0.8, 4096: 1.05}, 2048) == (0, "")  # a clear 20%
    assert pick({2048: 1.0, 0: 1.3, 4096: 1.1}, 0) == (2048, "")
    chosen, note = pick({2048: 1.3, 0: 45.0, 4096: 1.4}, 0)  # 0 B timed while another process held the cores
    assert chosen == 0 and "the host was busy, the vendor's default kept" in note and "spread 35x" in note


def test_the_prefetch_distance_is_chosen_said_and_changes_no_number():
    """The weight stream's prefetch distance is picked per CPU (vendor default, a timed check) and said in the
    runtime report; any distance gives the same numbers, and a bad one is refused."""
    ops = kernels.kernel()
    chosen = kernels.PREFETCH["bytes"]
    assert chosen in kernels.PREFETCH_CANDIDATES and "measured GB/s" in kernels.PREFETCH["why"]
    w, x = torch.randn(300, 256).to(torch.bfloat16), torch.randn(3, 256).to(torch.bfloat16)
    try:
        outs = []
        for pf in kernels.PREFETCH_CANDIDATES:
            ops.set_prefetch(pf)
            outs.append(ops.gemv_bf16(x, w, False))
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert torch.allclose(outs[0], x.float() @ w.float().T, rtol=1e-2, atol=1e-2)
        with pytest.raises(RuntimeError, match="multiple of 64"):
            ops.set_prefetch(100)
    finally:
        ops.set_prefetch(chosen)
