"""FlashMask: the spec's worked examples, validation, tile classification, and every backend vs fp64."""

from __future__ import annotations

import os
import random

import pytest
import torch

from ernie45.attention import FlashMask, builders, flashmask_attention

N = 10


def _fm(causal, *vectors):
    return FlashMask(torch.tensor(list(zip(*vectors, strict=True)), dtype=torch.int32)[None, None], causal)


def _dense(fn) -> torch.Tensor:
    """The allowed-matrix [N, N] from a predicate fn(i, j) -> may row i see column j."""
    return torch.tensor([[bool(fn(i, j)) for j in range(N)] for i in range(N)])


def _doc(spans):
    return lambda i: next(k for k, (a, b) in enumerate(spans) if a <= i < b)


D3 = [(0, 4), (4, 7), (7, 10)]
doc3 = _doc(D3)
EXAMPLES = {
    # name: (mask from the spec's vectors, the same mask from our builder, the intended attention pattern)
    "causal document": (
        _fm(True, [4, 4, 4, 4, 7, 7, 7, 10, 10, 10]),
        builders.causal_document([4, 3, 3]),
        lambda i, j: j <= i and doc3(i) == doc3(j),
    ),
    "sliding window": (
        _fm(True, [3, 4, 5, 6, 7, 8, 9, 10, 10, 10]),
        builders.sliding_window(N, 2),
        lambda i, j: i - 2 <= j <= i,
    ),
    "shared question": (
        _fm(True, [10, 10, 10, 10, 7, 7, 7, 10, 10, 10]),
        builders.shared_question([(4, [3, 3])]),
        lambda i, j: j <= i and (j < 4 or doc3(i) == doc3(j)),
    ),
    "causal blockwise": (
        _fm(True, [4, 4, 4, 4] + [10] * 6, [7, 7, 7, 7] + [10] * 6),
        builders.causal_blockwise([4, 3, 3]),
        lambda i, j: j <= i and (doc3(i) == doc3(j) or i >= 7),
    ),
    "qk-sparse": (
        _fm(True, [10, 10, 2, 3, 4, 5, 6, 7, 10, 10], [10, 10, 5, 5, 5, 5, 8, 8, 10, 10]),
        builders.qk_sparse(N, {2: (2, 5), 3: (3, 5), 4: (4, 5), 5: (5, 5), 6: (6, 8), 7: (7, 8)}),
        lambda i, j: j <= i and not (j in (2, 3, 4) and i < 5) and not (j in (6, 7) and i < 8),
    ),
    "document": (
        _fm(False, [4, 4, 4, 4, 7, 7, 7, 10, 10, 10], [0, 0, 0, 0, 4, 4, 4, 7, 7, 7]),
        builders.document([4, 3, 3]),
        lambda i, j: doc3(i) == doc3(j),
    ),
    "prefix-LM causal": (
        _fm(False, [10] * 10, [0, 0, 0, 0, 0, 5, 6, 7, 8, 9]),
        builders.prefix_lm(N, 5),
        lambda i, j: j < 5 or j <= i,
    ),
    "prefix-LM document": (
        _fm(False, [3, 3, 3, 5, 5] + [10] * 5, [0, 0, 2, 3, 3, 5, 5, 7, 8, 9]),
        builders.prefix_lm_document([(3, 2), (2, 2), (5, 2)]),
        lambda i, j: (
            _doc([(0, 3), (3, 5), (5, 10)])(i) == _doc([(0, 3), (3, 5), (5, 10)])(j)
            and (j <= i or j in (0, 1, 3, 4, 5, 6))
        ),
    ),
    "global + sliding": (
        _fm(
            False, [10, 10, 4, 5, 6, 7, 8, 9, 10, 10], [10] * 10, [0, 0, 0, 0] + [2] * 6, [0, 0, 0, 0, 3, 4, 5, 6, 7, 8]
        ),
        builders.global_sliding(N, 2, 1),
        lambda i, j: i < 2 or j < 2 or abs(i - j) <= 1,
    ),
    "image in causal text": (
        _fm(False, [10] * 10, [0, 1, 2, 3, 3, 3, 3, 7, 8, 9]),
        builders.image_in_text(N, [(3, 7)]),
        lambda i, j: j <= i or (3 <= i < 7 and 3 <= j < 7),
    ),
    "ERNIE packed SFT 3+4, padded": (
        _fm(True, [3, 3, 3, 7, 7, 7, 7, 7, 8, 9]),
        builders.causal_document([3, 4], total=N),
        lambda i, j: j <= i < 7 and _doc([(0, 3), (3, 7)])(i) == _doc([(0, 3), (3, 7)])(j),
    ),
    "ERNIE packed DPO": (
        _fm(True, [5, 5, 4, 4, 5, 9, 9, 8, 9, 9]),
        builders.shared_question([(2, [2, 1]), (2, [1, 1])], total=N),
        lambda i, j: (
            j <= i < 9
            and (a := _doc([(0, 2), (2, 4), (4, 5), (5, 7), (7, 8), (8, 9)]))(i) is not None
            and ((i < 5) == (j < 5))
            and (a(j) in (0, 3) or a(i) == a(j))
        ),
    ),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_worked_examples_reproduce_their_dense_matrices(name):
    spec_mask, built, pattern = EXAMPLES[name]
    expected = _dense(pattern)
    assert torch.equal(spec_mask.to_dense()[0, 0], expected)
    assert torch.equal(built.to_dense()[0, 0], expected)


def test_validation_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"causal=True takes C in \(1, 2\)"):
        FlashMask(torch.zeros(1, 1, 4, 4, dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match=r"causal=False takes C in \(2, 4\)"):
        FlashMask(torch.zeros(1, 1, 4, 1, dtype=torch.int32), causal=False)
    with pytest.raises(ValueError, match="4-D tensor"):
        FlashMask(torch.zeros(4, 1, dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match="integers"):
        FlashMask(torch.zeros(1, 1, 4, 1), causal=True)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        FlashMask(torch.full((1, 1, 4, 1), 5, dtype=torch.int32), causal=True)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="mask covers"):
        flashmask_attention(q, q, q, builders.causal(7))


# ---- random masks of every type ---------------------------------------------------------------------------
def _split(rng, n, parts):
    parts = max(1, min(parts, n))
    cuts = sorted(rng.sample(range(1, n), parts - 1)) if n > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def random_mask(kind: str, s: int, rng: random.Random) -> FlashMask:
    if kind == "causal":
        return builders.causal(s)
    if kind == "causal_document":
        lens = _split(rng, s, rng.randint(1, 8))
        return builders.causal_document(lens[:-1] or lens, total=s)  # last piece as padding
    if kind == "document":
        return builders.document(_split(rng, s, rng.randint(1, 8)))
    if kind == "shared_question":
        samples, left = [], s
        while left > 0:
            n = min(left, rng.randint(1, max(1, s // 2)))
            q_len, *answers = _split(rng, n, rng.randint(1, 4)) if n > 1 else [1]
            samples.append((q_len, answers))
            left -= n
        return builders.shared_question(samples)
    if kind == "sliding_window":
        return builders.sliding_window(s, rng.randint(0, max(0, s // 3)))
    if kind == "causal_blockwise":
        return builders.causal_blockwise(_split(rng, s, rng.randint(1, 5)))
    if kind == "prefix_lm":
        return builders.prefix_lm(s, rng.randint(0, s))
    if kind == "prefix_lm_document":
        return builders.prefix_lm_document([(n, rng.randint(0, n)) for n in _split(rng, s, rng.randint(1, 5))])
    if kind == "global_sliding":
        return builders.global_sliding(s, rng.randint(0, min(4, s)), rng.randint(0, max(0, s // 4)))
    if kind == "qk_sparse":
        ev = {j: tuple(sorted(rng.sample(range(j, s + 1), 2))) for j in range(s) if rng.random() < 0.3 and j < s}
        return builders.qk_sparse(s, ev)
    if kind == "image_in_text":
        a = rng.randint(0, s)
        return builders.image_in_text(s, [(a, rng.randint(a, s))])
    if kind == "padding":
        return builders.padding(rng.randint(0, s), s, left=rng.random() < 0.5)
    causal, c = rng.choice([(True, 1), (True, 2), (False, 2), (False, 4)])  # random intervals
    idx = torch.tensor([[sorted(rng.randint(0, s) for _ in range(2))[k % 2] for k in range(c)] for _ in range(s)])
    return FlashMask(idx.to(torch.int32)[None, None], causal)


KINDS = [
    "causal",
    "causal_document",
    "document",
    "shared_question",
    "sliding_window",
    "causal_blockwise",
    "prefix_lm",
    "prefix_lm_document",
    "global_sliding",
    "qk_sparse",
    "image_in_text",
    "padding",
    "random",
]
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def _batch_mask(kind, s, seed, mask_heads=1):
    rng = random.Random(seed)
    while True:  # two batch rows with different masks of the same kind (same causal flag and C)
        masks = [random_mask(kind, s, rng) for _ in range(2 * mask_heads)]
        if len({(m.causal, m.startend_row_indices.shape[-1]) for m in masks}) == 1:
            break
    idx = torch.cat([m.startend_row_indices for m in masks]).view(2, mask_heads, s, -1)
    return FlashMask(idx, masks[0].causal)


def _check(backend, kind, s, dtype, seed=0, mask_heads=1, d=16, grads=True):
    mask = _batch_mask(kind, s, seed, mask_heads)
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(2, 4, s, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(2, 2, s, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(2, 2, s, d, generator=g, dtype=torch.float64)
    w = torch.randn(2, 4, s, d, generator=g, dtype=torch.float64)

    def run(dt, which):
        q, k, v = (x.detach().to(dt).clone().requires_grad_(grads) for x in (q64, k64, v64))
        out = flashmask_attention(q, k, v, mask, backend=which)
        if not grads:
            return [out.double()]
        (out.double() * w).sum().backward()
        return [out.double(), q.grad.double(), k.grad.double(), v.grad.double()]

    ref = run(torch.float64, "reference")
    got = run(dtype, backend)
    low = run(dtype, "reference") if dtype != torch.float32 else ref
    allowed = mask.to_dense().any(-1).repeat_interleave(4 // mask_heads, 1)
    assert torch.all(got[0][~allowed] == 0), "fully masked rows must give exactly 0"
    for i, (a, r, lo) in enumerate(zip(got, ref, low, strict=True)):
        assert torch.isfinite(a).all()
        floor = TOL[dtype][0 if i == 0 else 1]
        bound = max(2 * (lo - r).abs().max().item(), floor)
        assert (a - r).abs().max().item() <= bound, (backend, kind, s, dtype, ["out", "dq", "dk", "dv"][i])


@pytest.mark.parametrize("s", [1, 17, 127, 128, 129, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_blocksparse_matches_fp64_reference(kind, s):
    for dtype in (torch.float32, torch.bfloat16):
        _check("blocksparse", kind, s, dtype, seed=s)
    _check("blocksparse", kind, min(s, 129), torch.float32, seed=s + 1, mask_heads=2)


@pytest.mark.parametrize("kind", ["causal_document", "document", "shared_question", "global_sliding", "random"])
def test_flex_matches_fp64_reference(kind):
    grads = torch.cuda.is_available()  # FlexAttention has no CPU backward; forward here, both on a GPU
    for s in (17, 129, 300):
        _check("flex", kind, s, torch.float32, seed=s, grads=grads)
    _check("flex", kind, 129, torch.float32, seed=3, mask_heads=2, grads=grads)


def test_flex_block_mask_from_min_max_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from ernie45.attention.flex import block_mask_from_flashmask, mask_mod_for

    mask = _batch_mask("causal_document", 300, seed=1)
    fast = block_mask_from_flashmask(mask, q_heads=4)
    slow = create_block_mask(mask_mod_for(mask, 4), 2, 4, 300, 300, device="cpu")
    q = torch.randn(2, 4, 300, 16)
    a = flex_attention(q, q, q, block_mask=fast)
    b = flex_attention(q, q, q, block_mask=slow)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["causal_document", "document", "qk_sparse", "global_sliding", "padding"])
def test_triton_kernel_under_the_interpreter(kind):
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest on CPU
    for s in (1, 17, 129):
        _check("triton", kind, s, torch.float32, seed=s)
    _check("triton", kind, 70, torch.float32, seed=5, mask_heads=2)


def test_tile_classification_is_sound():
    rng = random.Random(0)
    for trial in range(300):
        s = rng.randint(1, 60)
        mask = random_mask(rng.choice(KINDS), s, rng)
        rb, cb = rng.randint(1, 9), rng.randint(1, 9)
        skip, partial = mask.classify(rb, cb)
        allowed = mask.to_dense()[0, 0]
        for r in range(skip.shape[2]):
            for c in range(skip.shape[3]):
                tile = allowed[r * rb : (r + 1) * rb, c * cb : (c + 1) * cb]
                if skip[0, 0, r, c]:
                    assert not tile.any(), (trial, r, c)
                elif not partial[0, 0, r, c]:
                    assert tile.all(), (trial, r, c)


def test_mask_memory_is_linear():
    m = builders.causal_document([4096] * 8)
    assert m.nbytes == 32768 * 4 and m.nbytes * 1000 <= 32768 * 32768  # vs a dense bool mask


def test_ragged_batch_prefilled_as_one_packed_sequence(ref_moe_dir):
    import ernie45
    from ernie45.attention.packing import pack_sequences, unpack

    model = ernie45.load(ref_moe_dir)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (9, 3, 14)]
    packed = pack_sequences(rows, total=30)
    with torch.no_grad():
        logits = model(
            packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"]
        ).logits
        for row, got in zip(rows, unpack(logits, packed["lengths"]), strict=True):
            alone = model(torch.tensor([row])).logits[0]
            assert (got - alone).abs().max() <= 1e-4
