"""Weight-only int8 / int4 quantization: kernels against float, and whole models against their float logits."""

from __future__ import annotations

import importlib

import pytest
import torch
from chat_fixtures import EXTRA, tiny_chat_config, write_spm_tokenizer

from ernie45.engine import LLM, SamplingParams
from ernie45.model import Ernie45ForConditionalGeneration
from ernie45.runtime.quant import QuantExpertGroup, QuantLinear, quantize_int4, quantize_int8


@pytest.mark.parametrize("rows", [15, 66])  # on CPU: the packed decode kernels, and the dequantised prefill path
@pytest.mark.parametrize("out", [96, 128])  # int4 tiles are read back directly for multiples of 64 rows
@pytest.mark.parametrize("bits,group,tol", [(8, 32, 0.01), (4, 32, 0.12), (4, 64, 0.15), (4, 128, 0.2)])
def test_quant_linear_tracks_the_float_layer(bits, group, tol, rows, out):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, out, bias=True)
    x = torch.randn(rows // 3, 3, 256)
    q = QuantLinear.from_float(lin.weight.data, lin.bias.data, bits, group)
    want, got = lin(x), q(x)
    assert got.shape == want.shape
    rel = (got - want).norm() / want.norm()
    assert rel < tol
    assert q.qweight.dtype in (torch.int8, torch.uint8, torch.int32)  # no float copy of the weight is kept
    assert not any(b.dtype.is_floating_point and b.numel() >= lin.weight.numel() for b in q.buffers())
    codes, scales = q.portable()  # what a saved checkpoint holds: rebuilt, it computes the same
    again = QuantLinear(codes, scales, lin.bias.data, bits=bits, group=group)
    assert torch.allclose(again(x), got, atol=1e-5)


def test_int8_at_widths_the_packed_kernel_cannot_read_runs_and_stays_close():
    """torch's int8-pack matmul crashed the process for input widths that are not multiples of 16 (a tiny
    model's 24-wide shared expert): those linears take the dequantised route. In a subprocess, so a regression
    fails this test instead of killing the run."""
    import subprocess
    import sys

    code = ("import torch\nfrom ernie45.runtime.quant import QuantLinear\n"
            "for k in (8, 24, 40, 72):\n"
            "    for rows in (1, 8, 100):\n"
            "        w, x = torch.randn(48, k), torch.randn(rows, k)\n"
            "        q = QuantLinear.from_float(w, None, 8)\n"
            "        rel = float((q(x) - x @ w.T).norm() / (x @ w.T).norm())\n"
            "        assert rel < 0.02, (k, rows, rel)\n"
            "print('ok')\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_int4_prefill_path_matches_the_kernel():
    """Many rows run on W^T unpacked from the CPU kernel's tiles: the same codes, the same products."""
    torch.manual_seed(0)
    w = torch.randn(192, 128)
    codes, scales = quantize_int4(w, 32)
    q = QuantLinear(codes, scales, None, bits=4, group=32)
    assert torch.equal(q.portable()[0].long(), codes.long())
    from ernie45.runtime.quant import PACKED_ROWS, torch_reads_cpu_int4_tiles

    x = torch.randn(PACKED_ROWS[4] + 1, 128)
    deq = (codes.view(192, 4, 32).float() - 8) * scales[..., 0].T[..., None] + scales[..., 1].T[..., None]
    want = x @ deq.view(192, 128).T
    got = q(x)  # more rows than PACKED_ROWS: the dequantised path
    assert (got - want).norm() / want.norm() < 0.01  # only bf16 rounding differs
    if torch_reads_cpu_int4_tiles():  # torch's CPU kernel on the same tiles (where it is built to read them)
        kernel = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), q.qweight, 32, q.scales.bfloat16()).float()
        assert (got - kernel).norm() / kernel.norm() < 0.01
    # fewer rows: torch's kernel, or the dequantised product where torch cannot read the tiles
    rows = torch.randn(PACKED_ROWS[4] - 1, 128)
    assert ((q(rows) - rows @ deq.view(192, 128).T).norm() / (rows @ deq.view(192, 128).T).norm()) < 0.01


def test_codes_round_trip():
    w = torch.randn(8, 64)
    q, s = quantize_int8(w)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6
    codes, sz = quantize_int4(w, 32)
    deq = (codes.view(8, 2, 32).float() - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    assert (deq.view(8, 64) - w).abs().max() <= sz[..., 0].max() / 2 + 1e-5
    with pytest.raises(ValueError, match="multiple of the group"):
        quantize_int4(torch.randn(4, 48), 32)


def _moe_checkpoint(path):
    """A tiny MoE checkpoint whose widths the int4 kernel can tile (multiples of 32)."""
    write_spm_tokenizer(path)
    torch.manual_seed(0)
    groups = [dict(name="text", num_experts=4, intermediate_size=32, modalities=[0, 1, 2, 3])]
    config = tiny_chat_config(400 + len(EXTRA), hidden_size=64, intermediate_size=128, expert_groups=groups,
                              moe_shared_intermediate_size=64)  # fmt: skip
    Ernie45ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_quantized_moe_model_stays_close(tmp_path):
    path = _moe_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([[400, 294, 261, 358, 341, 313, 300, 290]])
    ref = LLM(path).model(input_ids=ids).logits
    for spec, tol in (("int8", 0.02), ("int4", 0.25)):
        llm = LLM(path, quantization=spec)
        assert any(isinstance(m, QuantExpertGroup) for m in llm.model.modules())
        assert any(isinstance(m, QuantLinear) for m in llm.model.modules())
        out = llm.model(input_ids=ids).logits
        rel = (out - ref).norm() / ref.norm()
        assert rel < tol, (spec, rel)
        assert len(llm.generate("hello", None)[0].token_ids) >= 1
    with pytest.raises(ValueError, match="use int8, int4"):
        LLM(path, quantization="int3")


def test_a_quantizing_load_never_holds_the_float_model_and_gives_the_same_codes(tmp_path, monkeypatch):
    """`LLM(dir, quantization=...)` quantizes each decoder layer as soon as it is read: when a layer is handed
    over, the layers before it are quantized already and those after it hold nothing yet."""
    from torch import nn

    import ernie45
    from ernie45.runtime.prepare import Plan, QuantizingLoader, prepare

    path = _moe_checkpoint(tmp_path / "ckpt")
    seen = []

    class Watching(QuantizingLoader):
        def __call__(self, layer):
            model_layers = layer_list[0]
            floats = [
                i
                for i, other in enumerate(model_layers)
                if any(isinstance(m, nn.Linear) and m.weight.device.type != "meta" for m in other.modules())
            ]
            seen.append(floats)
            super().__call__(layer)

    layer_list = []
    loader = Watching("int4")
    module = importlib.import_module("ernie45.checkpoint.load")
    original = module.build_on_meta

    def build(config):
        model = original(config)
        layer_list.append(model.model.layers)
        return model

    monkeypatch.setattr(module, "build_on_meta", build)
    streamed = ernie45.load(path, dtype=torch.float32, on_layer=loader)
    monkeypatch.undo()
    n = streamed.config.num_hidden_layers
    assert loader.layers == n and len(seen) == n
    assert seen == [[i] for i in range(n)]  # only the layer being quantized is in float, in file order
    streamed.quantized_while_loading = True
    report = prepare(streamed, Plan(quantization="int4"))
    assert "while loading" in str(report)
    whole = ernie45.load(path, dtype=torch.float32)
    prepare(whole, Plan(quantization="int4"))
    ids = torch.tensor([[400, 294, 261, 358, 341, 313, 300, 290]])
    assert torch.equal(streamed(input_ids=ids).logits, whole(input_ids=ids).logits)  # the same codes
    llm = LLM(path, quantization="int4")
    assert "layer by layer while loading" in str(llm.report)
    assert torch.equal(llm.model(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_quantize_command_writes_a_checkpoint_that_loads_as_quantized(tmp_path, capsys):
    from ernie45.cli import main

    src = _moe_checkpoint(tmp_path / "src")
    ids = torch.tensor([[400, 294, 261, 358, 341, 313]])
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", str(src), str(out), "--bits", str(bits)]) == 0
        assert f"int{bits}" in capsys.readouterr().out
        fly = LLM(src, quantization=f"int{bits}").model
        embed = fly.model.embed_tokens.weight  # the file holds the token table in int8 per row: round it the same
        codes, scales = quantize_int8(embed.data)
        embed.data.copy_(codes.float() * scales[:, None])
        on_the_fly = fly(input_ids=ids).logits
        saved = LLM(out)  # the tokenizer came along; the loader sees the quantization in config.json
        assert any(isinstance(m, QuantLinear) for m in saved.model.modules())
        fused = [m for m in saved.model.modules() if isinstance(getattr(m, "gate_up_proj", None), QuantLinear)]
        assert fused  # the loaded codes stacked into one gate/up matmul, as on the fly
        assert torch.allclose(saved.model(input_ids=ids).logits, on_the_fly, atol=1e-5)
    assert main(["quantize", str(src), str(tmp_path / "q8"), "--bits", "8"]) == 2  # never over a checkpoint
    assert "not empty" in capsys.readouterr().err


def test_a_quantized_checkpoint_is_written_in_shards_and_read_back_tensor_by_tensor(tmp_path):
    """Past `shard_bytes` the file is split with the official index; every shard is read back, lazily, to the same
    model (a 21B int4 file is ~12 GB: neither its save nor its load may hold it whole)."""
    import json
    import os

    from ernie45.checkpoint import load
    from ernie45.checkpoint.files import CheckpointError, SafetensorsFile
    from ernie45.checkpoint.quantized import save_quantized
    from ernie45.runtime.quant import quantize

    src = _moe_checkpoint(tmp_path / "src")
    ids = torch.tensor([[400, 294, 261, 358, 341, 313]])
    model = quantize(load(src, dtype=torch.float32), bits=4, group_size=32)
    one = save_quantized(model, tmp_path / "one")
    codes, scales = quantize_int8(model.model.embed_tokens.weight.data)  # the file's token table: int8 per row
    model.model.embed_tokens.weight.data.copy_(codes.float() * scales[:, None])
    want = model(input_ids=ids).logits
    many = save_quantized(model, tmp_path / "many", shard_bytes=8 * 1024)
    assert [f.name for f in one.glob("*.safetensors")] == ["model.safetensors"]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(many.glob("*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [f.name for f in shards]
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    whole = SafetensorsFile(one / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(e[3] - e[2] for e in whole.entries.values())
    assert sorted(index["weight_map"]) == sorted(whole.keys())
    assert not list(many.glob(".writing-*")) and not list(many.glob("part-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in shards} == {0o666 & ~umask}  # as any file (safetensors writes 0600)
    for path in (one, many):
        assert torch.allclose(load(path)(input_ids=ids).logits, want, atol=1e-5)
    (many / shards[1].name).unlink()  # a shard gone: said by name, not a half-built model
    with pytest.raises(CheckpointError, match=shards[1].name):
        load(many)


def test_int4_files_hold_the_kernels_tiles_and_older_packed_files_still_load(tmp_path):
    """A CPU load takes an int4 file's tiles as they are (no repacking: the second start of a 21B model spent most
    of its time there); a file written before tiles (every code two to a byte) loads to the same model."""
    import json

    from safetensors.torch import save_file

    from ernie45.checkpoint import load
    from ernie45.checkpoint.files import SafetensorsFile
    from ernie45.checkpoint.quantized import _pack, save_quantized
    from ernie45.runtime.quant import codes_of_cpu_int4_tiles, quantize

    model = quantize(load(_moe_checkpoint(tmp_path / "src"), dtype=torch.float32), bits=4, group_size=32)
    out = save_quantized(model, tmp_path / "q")
    f = SafetensorsFile(out / "model.safetensors")
    codes = {k: f.dtype_shape(k)[1] for k in f.keys() if k.endswith(".codes") and f.dtype_shape(k)[0] == torch.uint8}
    tiled = [k for k, shape in codes.items() if len(shape) == 3]
    assert tiled and len(tiled) < len(codes)  # widths of 64 rows and more as tiles, the others packed
    back = load(out)
    for key in tiled:
        name = key[: -len(".codes")]
        assert torch.equal(f.read(key).flatten(), model.get_submodule(name).qweight.flatten())
        assert torch.equal(back.get_submodule(name).qweight, model.get_submodule(name).qweight)
    ids = torch.tensor([[400, 294, 261, 358, 341, 313]])
    want = back(input_ids=ids).logits
    assert torch.equal(load(out, mmap=False)(input_ids=ids).logits, want)
    old = tmp_path / "old"
    old.mkdir()
    tensors = {k: f.read(k) for k in f.keys()}
    for key in tiled:
        tensors[key] = _pack(codes_of_cpu_int4_tiles(tensors[key])).contiguous()
    save_file(tensors, old / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["ernie45_quantization"]["int4_codes"] = "packed"
    (old / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (out / name).exists():
            (old / name).write_bytes((out / name).read_bytes())
    assert torch.equal(load(old)(input_ids=ids).logits, want)


def test_a_cpu_load_uses_the_int4_tiles_where_they_lie_in_the_mapped_file(tmp_path):
    """The tiles and scales are the file's pages (a second start of a 21B model reads them from the page cache, and
    they take no memory of the process's own); gathering onto 2 MB pages leaves them there, a write to them stays
    in the process, and `mmap=False` reads them in instead."""
    import hashlib

    from ernie45.checkpoint import load
    from ernie45.checkpoint.quantized import save_quantized
    from ernie45.runtime import hugepages
    from ernie45.runtime.quant import QuantLinear, quantize

    model = quantize(load(_moe_checkpoint(tmp_path / "src"), dtype=torch.float32), bits=4, group_size=32)
    out = save_quantized(model, tmp_path / "q") / "model.safetensors"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    mapped, read = load(out.parent), load(out.parent, mmap=False)
    tiled = [n for n, m in mapped.named_modules() if isinstance(m, QuantLinear) and m.cpu_tiles() is not None]
    assert tiled
    for name in tiled:
        m = mapped.get_submodule(name)
        assert hugepages.is_mapped_file(m.qweight) and hugepages.is_mapped_file(m.scales)
        assert not hugepages.is_mapped_file(read.get_submodule(name).qweight)
    assert not hugepages.is_mapped_file(mapped.model.embed_tokens.weight)  # (widened from int8: the process's own)
    ids = torch.tensor([[400, 294, 261, 358, 341, 313]])
    assert torch.equal(mapped(input_ids=ids).logits, read(input_ids=ids).logits)
    where = {name: mapped.get_submodule(name).qweight.data_ptr() for name in tiled}
    hugepages.gather(mapped, min_bytes=0)
    assert {name: mapped.get_submodule(name).qweight.data_ptr() for name in tiled} == where
    mapped.get_submodule(tiled[0]).qweight.zero_()
    assert not torch.equal(mapped(input_ids=ids).logits, read(input_ids=ids).logits)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest  # (copy on write: the file is untouched)
    assert all(hugepages.is_mapped_file(load(out.parent, mmap=True).get_submodule(n).qweight) for n in tiled)
    with pytest.raises(ValueError, match="mmap=True: only a quantized checkpoint .* is not quantized"):
        load(tmp_path / "src", mmap=True)  # (a float checkpoint: nothing would be mapped)


def test_bf16_model_on_cpu_runs_packed_linears_with_the_same_answers(tmp_path):
    from ernie45.runtime.packed import PackedLinear

    path = _moe_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([[400, 294, 261, 358, 341, 313, 300, 290]])
    packed = LLM(path, dtype=torch.bfloat16)
    assert isinstance(packed.model.lm_head, PackedLinear)
    assert "packed" not in " ".join(packed.model.state_dict())  # the oneDNN copies stay out of the state dict
    plain = Ernie45ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits.float(), packed.model(input_ids=ids).logits.float()
    assert (got - want).norm() / want.norm() < 0.02
    sampling = SamplingParams(max_tokens=6, temperature=0)
    assert (
        LLM(plain, processor=packed.processor).generate([ids[0].tolist()], sampling)[0].token_ids
        == packed.generate([ids[0].tolist()], sampling)[0].token_ids
    )


@pytest.fixture
def own_kernels():
    """All of ernie45's CPU decode kernels switched on (by default only the bf16 one is) for one test."""
    from ernie45.runtime import kernels

    with kernels.switched(True):
        yield kernels


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_decode_kernel_matches_a_matmul(rows, own_kernels):
    kernels = own_kernels

    if kernels.kernel() is None:
        pytest.skip("no AVX512-BF16 CPU or no C++ compiler here: the kernel is not used (torch's linear is)")
    torch.manual_seed(0)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    w = torch.randn(1027, 96, dtype=torch.bfloat16)  # N not a multiple of the kernel's 4-row blocks
    want = x.float() @ w.float().T
    assert torch.allclose(kernels.gemv(x, w), want, atol=1e-4, rtol=1e-4)


def test_bf16_int8_and_int4_decode_kernels_are_on_by_default(monkeypatch):
    from ernie45.runtime import kernels
    from ernie45.runtime.packed import PackedLinear, _reorders

    monkeypatch.delenv("ERNIE45_CPU_KERNELS", raising=False)
    kernels.kernel.cache_clear()
    try:
        if kernels.kernel() is None:
            pytest.skip("neither AVX512-BF16 nor AVX2 here, or no C++ compiler: torch's kernels run")
        assert kernels.ready()
        avx2 = kernels.isa() == "avx2"  # (that build writes VBMI's and VNNI's instructions out)
        assert kernels.ready("int4") == (avx2 or {"avx512vbmi", "avx512_vnni"} <= kernels._cpu_flags())
        assert kernels.ready("int8") == (avx2 or "avx512_vnni" in kernels._cpu_flags())
        lin = torch.nn.Linear(64, 40, dtype=torch.bfloat16)
        packed = PackedLinear(lin)
        assert packed.plain is not None and ("AVX2" if avx2 else "AVX512-BF16") + " decode kernel" in repr(packed)
        x = torch.randn(2, 64, dtype=torch.bfloat16)
        assert torch.allclose(packed(x).float(), lin(x).float(), atol=0.05)
        monkeypatch.setenv("ERNIE45_CPU_KERNELS", "0")
        kernels.kernel.cache_clear()
        assert not kernels.ready() and not kernels.ready("int4")
        if _reorders():  # oneDNN packs bf16 on this CPU
            assert "oneDNN" in repr(PackedLinear(lin))
        else:
            with pytest.raises(ValueError, match="neither the bf16 decode kernel nor oneDNN"):
                PackedLinear(lin)
        monkeypatch.setenv("ERNIE45_CPU_KERNELS", "bf16")
        kernels.kernel.cache_clear()
        assert kernels.ready() and not kernels.ready("int4") and not kernels.ready("int8")
    finally:
        kernels.kernel.cache_clear()


@pytest.mark.parametrize(("bits", "group", "rows"), [(8, 32, 1), (8, 32, 5), (4, 32, 1), (4, 64, 3), (4, 128, 8)])
def test_quantized_decode_kernels_match_the_dequantised_weight(bits, group, rows, own_kernels):
    from ernie45.runtime.quant import QuantLinear

    kernels = own_kernels
    if kernels.kernel() is None:
        pytest.skip("no AVX512-BF16 CPU or no C++ compiler here: torch's packed kernels run instead")
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(192, 256), None, bits, group)
    x = torch.randn(rows, 256)
    exact = x @ q.dequantized_t(torch.float32)
    if not kernels.ready(f"int{bits}"):
        pytest.skip("no AVX512-VBMI / VNNI here: quantized decode runs on torch's or FBGEMM's kernels")
    # both kernels round x to int8 per 32 columns (scale max|x| / 127) for the codes' part; int4's group zeros
    # meet the exact sum of x
    amax = x.view(rows, -1, 32).abs().amax(-1, keepdim=True)
    xq = (torch.round(x.view(rows, -1, 32) * (127 / amax)) * (amax / 127)).view(rows, -1)
    want = xq @ q.dequantized_t(torch.float32)
    if bits == 4:
        zeros = q.scales.float()[..., 1]  # [K / group, N]
        want += (x - xq).view(rows, -1, group).sum(-1) @ zeros
    assert 1e-3 < (want - exact).norm() / exact.norm() < 0.02  # what rounding x costs: small, not nothing
    assert torch.allclose(q(x), want, atol=1e-4, rtol=1e-4)


def test_a_batch_row_gets_the_numbers_it_gets_alone(own_kernels):
    """The decode kernels share work between the rows of a batch (int4: each tile's codes decoded once for up to
    four rows), never the sums: a row's result does not depend on the rows beside it."""
    from ernie45.runtime.quant import QuantLinear

    kernels = own_kernels
    if kernels.kernel() is None or not kernels.ready("int4"):
        pytest.skip("no AVX512-BF16 / VBMI / VNNI CPU or no C++ compiler here")
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(128, 256), None, 4, 64)
    q8 = QuantLinear.from_float(torch.randn(96, 256, dtype=torch.bfloat16), None, 8)  # (bf16 scales)
    w = torch.randn(96, 256, dtype=torch.bfloat16)
    x = torch.randn(8, 256)
    for m in (2, 3, 5, 7, 8):
        alone = torch.cat([q(x[i : i + 1]) for i in range(m)])
        assert torch.equal(q(x[:m]), alone)
        xb = x.bfloat16()
        assert torch.equal(q8(xb[:m]), torch.cat([q8(xb[i : i + 1]) for i in range(m)]))
        alone = torch.cat([kernels.gemv(x[i : i + 1], w) for i in range(m)])
        assert torch.equal(kernels.gemv(x[:m], w), alone)


@pytest.mark.parametrize("dequantised", [True, False])
def test_int8_prefill_rows_take_the_route_measured_faster_here(monkeypatch, dequantised):
    """Many bf16 rows through an int8 linear: dequantised where that measured faster (AMD EPYC: 2-2.5x torch's
    int8 kernel from 48 rows), torch's kernel where not; either way the weight-only product."""
    from ernie45.runtime import quant
    from ernie45.runtime.quant import PACKED_ROWS, QuantLinear

    assert isinstance(quant.int8_many_rows_dequantised(), bool)  # the measurement itself runs here
    monkeypatch.setattr(quant, "int8_many_rows_dequantised", lambda: dequantised)
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(96, 256, dtype=torch.bfloat16), None, 8)
    x = torch.randn(PACKED_ROWS[8] + 8, 256, dtype=torch.bfloat16)
    calls = []
    for route in ("_dequantised", "_int8"):
        fn = getattr(q, route)
        monkeypatch.setattr(q, route, lambda x2, fn=fn, route=route: calls.append(route) or fn(x2))
    q._chosen = False
    y = q(x)
    assert calls == (["_dequantised"] if dequantised else ["_int8"])
    exact = x.float() @ q.dequantized_t(torch.float32)
    assert (y.float() - exact).norm() / exact.norm() < 0.01


def test_int4_prefill_rows_take_the_vnni_kernel_where_it_is_the_faster(own_kernels, monkeypatch):
    """On an AVX512 build the int4 kernel beats torch's int4 kernel and the dequantised matmul at 16-1024 rows
    (docs/performance.md), so a prefill's rows take it too, in chunks, each row with the numbers it gets alone; on
    the AVX2 build, where it is the slower, they keep torch's routes."""
    from ernie45.runtime import quant
    from ernie45.runtime.quant import QuantLinear

    kernels = own_kernels
    if kernels.kernel() is None or not kernels.ready("int4"):
        pytest.skip("no C++ compiler or no int4 kernel here")
    monkeypatch.setattr(quant, "KERNEL_CHUNK", 16)  # rows past a chunk go in several calls
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(128, 256), None, 4, 64)
    x = torch.randn(300, 256, dtype=torch.bfloat16)  # past PACKED_ROWS[4] (the "many rows" route) too
    alone = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
    for m in (12, 40, 300):
        if kernels.isa() == "avx512":
            assert torch.equal(q(x[:m]), alone[:m])
        else:
            got = q(x[:m])
            assert not torch.equal(got, alone[:m])  # torch's kernel: x not rounded to int8
            assert (got.float() - alone[:m].float()).norm() / got.float().norm() < 0.02


@pytest.mark.skipif(not __import__("ernie45.runtime.quant", fromlist=["x"]).fbgemm_int8_available(),
                    reason="FBGEMM's int8 product needs VNNI")  # fmt: skip
def test_int8_decode_on_fbgemm_stays_close_and_keeps_one_copy_of_the_codes(monkeypatch):
    """Where ernie45's own int8 kernel does not run (no AVX512-BF16 here, or switched off as below) FBGEMM does."""
    from ernie45.runtime import kernels

    monkeypatch.setenv("ERNIE45_CPU_KERNELS", "bf16")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    q = QuantLinear.from_float(lin.weight.data, lin.bias.data, 8)
    codes = q.qweight.clone()
    x = torch.randn(3, 256)
    before = q(x)
    assert q.prepare_fbgemm_int8() and not q.prepare_fbgemm_int8()
    assert q.qweight is None and torch.equal(q.codes(), codes)  # the codes live in FBGEMM's packing only
    after = q(x)  # the row quantized to 8 bits: close to the weight-only product, not equal
    assert not torch.equal(after, before)
    assert (after - before).norm() / before.norm() < 0.01
    many = torch.randn(40, 256)  # prefill rows: the same product
    want = QuantLinear(codes, q.scales, lin.bias.data, bits=8)(many)
    assert (q(many) - want).norm() / want.norm() < 0.01
    assert torch.equal(q.portable()[0], codes)
    monkeypatch.delenv("ERNIE45_CPU_KERNELS")
    own = QuantLinear.from_float(lin.weight.data, lin.bias.data, 8)
    if kernels.ready("int8"):  # ernie45's kernel decodes from the codes as they are: FBGEMM gets none
        assert not own.prepare_fbgemm_int8() and torch.equal(own.qweight, codes)


def _dense_bf16_checkpoint(path):
    """A dense chat checkpoint stored in bf16 whose linears dominate its size, as in a real model."""
    write_spm_tokenizer(path)
    torch.manual_seed(0)
    config = tiny_chat_config(400 + len(EXTRA), hidden_size=256, intermediate_size=512, head_dim=64,
                              expert_groups=None, tie_word_embeddings=True)  # fmt: skip
    Ernie45ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_quantized_checkpoints_load_in_transformers_shrink_and_export_dequantised(tmp_path):
    from transformers import AutoModelForCausalLM, Ernie4_5ForCausalLM

    import ernie45
    from ernie45.cli import main

    src = _dense_bf16_checkpoint(tmp_path / "src")
    ids = torch.tensor([[400, 294, 261, 358, 341, 313]])
    sizes = {}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", str(src), str(out), "--bits", str(bits)]) == 0
        sizes[bits] = _size(out) / _size(src)
        ours = ernie45.load(out)
        theirs = AutoModelForCausalLM.from_pretrained(out)  # transformers' habit: the codes load, not random weights
        assert isinstance(theirs.lm_head, QuantLinear) and any(isinstance(m, QuantLinear) for m in theirs.modules())
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
        sep = ernie45.load_processor(out).ids["sep"]  # <|end_of_sentence|>: a chat turn's end
        assert theirs.config.use_cache and sep in theirs.generation_config.eos_token_id  # chat-ready as written
        float_logits = ernie45.load(src, dtype=torch.float32)(input_ids=ids).logits
        q_logits = ernie45.load(out, dtype=torch.float32)(input_ids=ids).logits
        official = ernie45.export(out, tmp_path / f"official{bits}")  # dequantised: every weight of the layout
        ref = Ernie4_5ForCausalLM.from_pretrained(official, dtype=torch.float32)
        with torch.no_grad():
            exported = ref(input_ids=ids).logits
        close, far = (
            ((exported - q_logits).norm() / q_logits.norm()),
            ((exported - float_logits).norm() / float_logits.norm()),
        )
        assert close < 0.02 and (bits == 8 or close < 0.2 * far), (close, far)  # the quantized model's values
        from safetensors.torch import load_file

        written = load_file(official / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(written, ours.model.layers[1].mlp.down_proj.dense_weight(torch.bfloat16))
        with pytest.raises(ValueError, match="dequantize"):
            ernie45.export(ours, tmp_path / f"refused{bits}")  # a quantized model object is refused, not half-written
    assert sizes[4] < 0.4 and sizes[8] < 0.65, sizes  # int4 about a third of bf16 (tokenizer and config aside)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_memory_estimate_counts_the_bytes_a_quantized_base_holds(tmp_path, bits):
    """`ernie45.train.memory.weight_bytes` (the numbers docs/distributed.md gives for 21B-A3B) against the
    buffers and parameters of a real quantized bf16 model of the same config."""
    import ernie45
    from ernie45.runtime.quant import quantize
    from ernie45.train.memory import weight_bytes

    path = _moe_checkpoint(tmp_path / "ckpt")
    model = ernie45.load(path, dtype=torch.bfloat16)
    quantize(model, bits, 32, experts=True, progress=False)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    codes, floats = weight_bytes(model.config, bits, 32)
    assert abs(codes + floats - held) / held < 0.01, (codes + floats, held)


def test_int4_tiles_are_made_byte_for_byte_as_torchs_converter_makes_them():
    """The loader's byte-arithmetic packing must give exactly the tiles torch's CPU int4 kernel reads where torch is
    built for AVX-512 (64-row tiles: byte j of tile t, column c holds rows 64t + j and 64t + j + 32), and those same
    tiles elsewhere (torch's AVX2 build tiles by 32 rows, and int4 then never goes through its kernel)."""
    from ernie45.runtime.quant import cpu_int4_tiles, torch_reads_cpu_int4_tiles

    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 64), (128, 96), (192, 1536), (320, 2560)):
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        c = codes.view(n // 64, 2, 32, k)
        want = (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).reshape(n, k // 2)
        if torch_reads_cpu_int4_tiles():
            assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), want)
        assert torch.equal(cpu_int4_tiles(codes), want), (n, k)
        q = QuantLinear(codes, torch.rand(k // 32, n, 2), None, bits=4)
        assert torch.equal(q.qweight, want)
        tiled = QuantLinear(q.cpu_tiles().clone(), q.scales, None, bits=4)  # from a file's tiles
        assert torch.equal(tiled.qweight, want)
        # no view: a view's base would keep the old bytes alive after `hugepages.gather` moves the weight (a
        # loaded 21B model took twice its memory)
        assert q.qweight._base is None and tiled.qweight._base is None


def test_a_tied_head_loads_from_the_embeddings_stored_codes_as_it_was_quantized(tmp_path):
    """The file stores the token table as int8 per row and no head; the tied head (int8 per channel of the same
    matrix, taken from the table's stored codes) comes back with the codes and scales it had."""
    import ernie45
    from ernie45.checkpoint.quantized import save_quantized
    from ernie45.runtime.quant import quantize

    model = quantize(ernie45.load(_dense_bf16_checkpoint(tmp_path / "src")), bits=4, lm_head=True)
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings
    back = ernie45.load(save_quantized(model, tmp_path / "q"))
    assert torch.equal(back.lm_head.codes(), model.lm_head.codes())
    assert torch.equal(back.lm_head.scales, model.lm_head.scales)


def test_many_bf16_rows_multiply_in_fp32_where_bf16_matmul_is_the_slower():
    """Prefill-sized bf16 products take fp32 where this CPU multiplies bf16 slower (measured once), else torch's bf16
    matmul; either way the answer is the product rounded to bf16, through `PackedLinear` too."""
    import torch.nn.functional as F

    from ernie45.runtime import kernels
    from ernie45.runtime.packed import PackedLinear, _reorders, bf16_matmul_in_fp32, linear_rows

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(20, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    want = F.linear(x.float(), w.float()).bfloat16() if bf16_matmul_in_fp32() else F.linear(x, w)
    got = linear_rows(x, w)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(linear_rows(x.float(), w), F.linear(x.float(), w.float()))  # fp32 rows stay fp32
    lin = torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    if (kernels.kernel() is not None and kernels.usable(w)) or _reorders():
        assert (PackedLinear(lin)(x).float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()


def test_a_kernel_build_the_cpu_cannot_run_or_that_does_not_exist_is_refused_by_name(monkeypatch):
    """`ERNIE45_CPU_ISA` picks the build; a name that is no build, or a build this CPU lacks the instructions for,
    turns the kernels off with the reason, instead of building another one silently."""
    from ernie45.runtime import kernels

    monkeypatch.delenv("ERNIE45_CPU_KERNELS", raising=False)
    kernels.kernel.cache_clear()
    try:
        monkeypatch.setenv("ERNIE45_CPU_ISA", "avx9")
        assert "ERNIE45_CPU_ISA='avx9' names no build" in kernels.unavailable() and kernels.kernel() is None
        flags = kernels._cpu_flags()
        missing = "avx512" if "avx512_bf16" not in flags else "avx2" if "avx2" not in flags else None
        if missing is not None:
            monkeypatch.setenv("ERNIE45_CPU_ISA", missing)
            kernels.kernel.cache_clear()
            assert kernels.isa() is None and kernels.kernel() is None
            assert f"ERNIE45_CPU_ISA={missing}: this CPU lacks" in kernels.unavailable()
        if {"avx2", "fma", "f16c"} <= flags:
            monkeypatch.setenv("ERNIE45_CPU_ISA", "avx2")
            assert kernels.isa() == "avx2"
    finally:
        kernels.kernel.cache_clear()
