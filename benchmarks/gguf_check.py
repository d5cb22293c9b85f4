"""Does llama.cpp read what `ernie45 export --format gguf` writes? Logits of the same prompts from ernie45 and from
llama-cpp-python on the exported file: cosine and top-1 agreement per position, and the tokenizer's ids.

Needs `bash benchmarks/setup_llamacpp.sh` (llama-cpp-python built for this CPU). Random weights at reduced
shapes of the dense (0.3B) and text-MoE (21B-A3B) families, written by transformers in the official layout.

    python benchmarks/gguf_check.py [--types bf16 q8_0 q4_0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from machine import cpu_name  # noqa: E402

SHAPES = {
    "dense (0.3B, 4 layers)": ("ernie-4.5-0.3b", {"num_hidden_layers": 4}),
    "MoE (21B-A3B, 3 layers, 16 experts of 64)": ("ernie-4.5-21b-a3b", {
        "num_hidden_layers": 3, "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 128, "intermediate_size": 2048, "moe_shared_intermediate_size": 1024,
        "expert_groups": [{"name": "text", "num_experts": 16, "intermediate_size": 512, "modalities": [0, 1, 2, 3]}],
        "moe_layer_end_index": 2}),
}  # fmt: skip
TEXTS = ["Hello world, this is a test.", "1 + 2 = 3; the quick brown fox jumps over the lazy dog.", "What is ERNIE?"]


def make_checkpoint(preset: str, over: dict, out: Path) -> Path:
    from chat_fixtures import write_spm_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from ernie45 import presets
    from ernie45.official_config import to_official

    d = to_official(presets.get(preset, **over))
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # a random router and correction bias of visible size (the checkpoint's would be trained)
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    write_spm_tokenizer(out)
    return out


def no_repacked_weights() -> None:
    """llama.cpp's CPU "extra buffer types" (weights repacked for AMX / AVX-512 at load) crash with a segmentation
    fault on Q8_0 and Q4_0 files on an Intel Xeon with AMX (llama-cpp-python 0.3.36, GGML_NATIVE) — on files
    written by llama.cpp's own converter as much as on ours; the plain CPU path reads the same file correctly.
    Loading without them keeps the check about the file, not about that path."""
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params


def as_in_file(model, type: str):
    """`model` with every weight the GGUF export quantizes (matrices with rows a whole number of blocks; not the
    routers, norms or biases) replaced by its `type` blocks read back: ernie45 then runs the file's own values, so
    the comparison checks the file's layout and llama.cpp's reading of it, not the quantization error."""
    import gguf
    import numpy as np

    if type not in ("q8_0", "q4_0"):
        return model
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("gate.weight") or p.shape[-1] % block:
                continue
            data = p.detach().float().numpy().astype(np.float32)
            back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
            p.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(data.shape)))
    return model


def check(gguf: Path, model, tokenizer) -> tuple[float, float, bool]:
    """(lowest cosine, top-1 agreement, tokenizer equal) over TEXTS."""
    import llama_cpp

    lm = llama_cpp.Llama(str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    cosines, agree, total, same_ids = [], 0, 0, True
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same_ids &= lm.tokenize(text.encode(), add_bos=False, special=False) == ids
        ids = [1, *ids]  # <s>
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0].float()
        lm.reset()
        lm.eval(ids)
        theirs = torch.tensor(lm.scores[: len(ids)], dtype=torch.float32)
        cosines += torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).tolist()
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    return min(cosines), agree / total, same_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["bf16", "q8_0", "q4_0"])
    ap.add_argument("--repacked", action="store_true", help="let llama.cpp repack weights (see no_repacked_weights)")
    args = ap.parse_args()
    if not args.repacked:
        no_repacked_weights()
    from ernie45 import load, load_processor
    from ernie45.checkpoint.gguf_export import export_gguf

    print(f"CPU: {cpu_name()}; ernie45 in fp32 (on the file's own quantized values for q8_0 / q4_0) against "
          f"llama.cpp on the exported GGUF, {len(TEXTS)} prompts")  # fmt: skip
    print(f"{'model':44} {'type':6} {'min cosine':>10} {'top-1':>7} {'tokens':>7}")
    for label, (preset, over) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(preset, over, Path(tmp) / "ckpt")
            tokenizer = load_processor(path).tokenizer
            for t in args.types:
                gguf = export_gguf(path, Path(tmp) / f"model-{t}.gguf", type=t)
                model = as_in_file(load(path, dtype=torch.float32), t).eval()
                low, top1, same = check(gguf, model, tokenizer)
                print(f"{label:44} {t:6} {low:10.5f} {top1:7.1%} {'same' if same else 'DIFFER':>7}")


if __name__ == "__main__":
    main()
