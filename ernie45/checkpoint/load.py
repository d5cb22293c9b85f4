"""`ernie45.load`: a checkpoint directory (official -PT, transformers-5 or ernie45 layout) -> a model.

The model is built on the meta device; each checkpoint tensor then goes, through the rule table of
its family, straight into the memory of the parameter (or stacked-expert slice) it belongs to.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Ernie45Config
from ..model import Ernie45ForConditionalGeneration
from ..official_config import read_config
from ..runtime.expert_parallel import LocalExperts, split_experts
from .files import CheckpointError, iter_tensors, weight_files
from .rules import RULES_BY_MODEL_TYPE, SIDE_KEYS, Rule

log = logging.getLogger("ernie45")
FP32_PARAMS = ("gate.weight", "gate.e_score_correction_bias")  # the router stays fp32 (docs/architecture.md, pitfall 3)


class _Filler:
    """Places checkpoint tensors into the meta model's parameters and checks that every one is covered."""

    def __init__(self, model: nn.Module, rules: tuple[Rule, ...], dtype, device, on_layer=None) -> None:
        self.model, self.rules, self.dtype, self.device = model, rules, dtype, torch.device(device or "cpu")
        self.meta = dict(model.named_parameters())
        # FSDP2 parameters sharded before the load (`_shard_before_reading`): this rank's rows, and the first one's
        # index in the whole parameter; `meta` holds the whole shape
        self.shards: dict[str, tuple[torch.Tensor, int]] = {}
        for name, p in list(self.meta.items()):
            if hasattr(p, "to_local"):
                local = p.to_local()
                rank, ranks = p.device_mesh.get_local_rank(), p.device_mesh.size()
                self.shards[name] = (local, rank * -(-p.shape[0] // ranks))
                self.meta[name] = torch.empty(p.shape, dtype=p.dtype, device="meta")
        self.held = {f"{n}.{attr}": (m.first, m.held, m.num_experts) for n, m in model.named_modules()
                     if isinstance(m, LocalExperts) for attr in ("gate_up_proj", "down_proj")}  # fmt: skip
        self.on_layer = on_layer  # called with each decoder layer as soon as all its weights are in
        self.layer_left: dict[str, int] = {}  # "model.layers.3." -> elements still to come
        for name, p in self.meta.items():
            prefix = _layer_prefix(name)
            if prefix is not None:
                self.layer_left[prefix] = self.layer_left.get(prefix, 0) + p.numel()
        groups = model.config.expert_groups or []
        self.groups = [g["name"] for g in groups]
        self.offsets = [sum(g["num_experts"] for g in groups[:i]) for i in range(len(groups) + 1)]
        self.widths = [g["intermediate_size"] for g in groups]
        self.storage: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}
        self.errors: list[str] = []
        self.side: dict[str, torch.Tensor] = {}

    def put(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], read) -> None:
        if SIDE_KEYS.search(key) and key in self.meta:  # the model's own MTP modules
            return self._fill(key, None, key, read=read, dtype=dtype, shape=shape)
        if SIDE_KEYS.search(key):
            self.side[key] = read()
            return
        if key == "lm_head.weight" and self.model.config.tie_word_embeddings:
            return  # tied: the embedding is the head (docs/architecture.md, pitfall 13)
        for rule in self.rules:
            fields = rule.match(key)
            if fields is not None:
                return self._apply(rule, fields, key, dtype, shape, read)
        self.errors.append(f"unexpected key {key} {list(shape)}")

    def _apply(self, rule: Rule, fields: dict, key: str, dtype, shape, read) -> None:
        if rule.part == "row" and "group" in fields:  # this group's own [1, E] row
            return self._fill(rule.ours.format(**fields), None, key, read().reshape(-1))
        if rule.part == "row":  # one row per expert group
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != len(self.groups)):
                return self.errors.append(f"{key}: shape {list(shape)}, expected [{len(self.groups)}, experts]")
            rows = read().reshape(len(self.groups), -1) if len(shape) == 2 else read()[None]
            for i, g in enumerate(self.groups):
                self._fill(rule.ours.format(**fields, group=g), None, key, rows[i])
            return
        if rule.part == "whole":
            name = rule.ours.format(**fields)
            slot = None
        else:
            e = int(fields["expert"])
            gi = next((i for i in range(len(self.groups)) if self.offsets[i] <= e < self.offsets[i + 1]), None)
            if gi is None:
                return self.errors.append(f"unexpected key {key}: expert {e} >= {self.offsets[-1]} experts")
            name = rule.ours.format(**fields, group=self.groups[gi])
            local = e - self.offsets[gi]
            if name in self.held:  # an expert-parallel rank: only its own experts are read
                first, held, _ = self.held[name]
                if not first <= local < first + held:
                    return
                local -= first
            slot = (rule.part, local, self.widths[gi])
        self._fill(name, slot, key, None, read, dtype, shape, rule.transpose)

    def _fill(self, name, slot, key, tensor=None, read=None, dtype=None, shape=None, transpose=False) -> None:
        meta = self.meta.get(name)
        if meta is None:
            return self.errors.append(f"unexpected key {key}: the model has no parameter {name}")
        if slot is None and name in self.held and not transpose:  # a stacked group on an expert-parallel rank
            first, held, total = self.held[name]
            tensor = tensor if tensor is not None else read()
            tensor = tensor[first : first + held] if tensor.shape[0] == total else tensor
        region_shape = _region(meta, slot).shape
        shape = tuple(tensor.shape) if tensor is not None else shape
        got = tuple(reversed(shape)) if transpose else tuple(shape)
        if got != tuple(region_shape):
            return self.errors.append(f"{key}: shape {list(shape)}, expected {list(region_shape)} (for {name})")
        if name in self.shards:
            return self._fill_shard(name, slot, tensor, read, transpose, region_shape)
        target_dtype = torch.float32 if name.endswith(FP32_PARAMS) else (self.dtype or dtype or tensor.dtype)
        whole_direct = slot is None and tensor is None and not transpose
        if name not in self.storage:
            if whole_direct and target_dtype == dtype and self.device.type == "cpu":
                self.storage[name] = read()  # read straight into the parameter's own memory
                self.filled[name] = meta.numel()
                return self._count(name, meta.numel())
            self.storage[name] = torch.empty(meta.shape, dtype=target_dtype, device=self.device)
            self.filled[name] = 0
        region = _region(self.storage[name], slot)
        if tensor is None and not transpose and region.dtype == dtype and region.is_contiguous() and region.is_cpu:
            read(region)
        else:
            src = tensor if tensor is not None else read()
            region.copy_(src.T if transpose else src)
        self.filled[name] += region.numel()
        self._count(name, region.numel())

    def _fill_shard(self, name, slot, tensor, read, transpose, region_shape) -> None:
        """This rank's rows of the region: an expert outside them is not read at all; of a whole tensor only the
        rows this rank keeps are read (their bytes lie together in the file; a transposed one is read whole and
        sliced), so no rank reads what it does not hold."""
        local, first = self.shards[name]
        rows = slice(0, self.meta[name].shape[0]) if slot is None else slice(slot[1], slot[1] + 1)
        lo, hi = max(rows.start, first), min(rows.stop, first + local.shape[0])
        if lo < hi:
            if slot is None and tensor is None and not transpose:
                src = read(rows=slice(lo, hi))
            else:
                src = tensor if tensor is not None else read()
                src = (src.T if transpose else src)[lo:hi] if slot is None else src
            with torch.no_grad():
                if slot is None:
                    local[lo - first : hi - first].copy_(src)
                else:
                    _region(local, (slot[0], slot[1] - first, slot[2])).copy_(src)
        self.filled[name] = self.filled.get(name, 0) + region_shape.numel()
        self._count(name, region_shape.numel())

    def _count(self, name: str, n: int) -> None:
        """A layer whose weights are all in is handed to `on_layer` now (so a quantizing load never holds more
        than the layers being read in float)."""
        prefix = _layer_prefix(name)
        if prefix is None or self.on_layer is None:
            return
        self.layer_left[prefix] -= n
        if self.layer_left[prefix] == 0 and not self.errors:
            self._install([k for k in self.storage if k.startswith(prefix)])
            self.on_layer(self.model.get_submodule(prefix[:-1]))

    def finish(self) -> None:
        tied = self.model.config.tie_word_embeddings
        for name, meta in self.meta.items():
            if tied and name == "lm_head.weight":
                continue
            if self.filled.get(name, 0) < meta.numel():
                what = "partly missing" if name in self.filled else "missing"
                self.errors.append(f"{what} weight for {name} {list(meta.shape)}")
            elif self.filled[name] > meta.numel():
                self.errors.append(f"{name} was written more than once (duplicate checkpoint keys)")
        if self.errors:
            shown = "\n  ".join(self.errors[:12])
            more = f"\n  ... and {len(self.errors) - 12} more" if len(self.errors) > 12 else ""
            raise CheckpointError(f"checkpoint does not fit the model ({len(self.errors)} problems):\n  {shown}{more}")
        self._install(list(self.storage))
        if tied and "lm_head.weight" not in self.shards:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight

    def _install(self, names: list[str]) -> None:
        """The read tensors become the modules' parameters (and leave `storage`)."""
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._parameters[attr] = nn.Parameter(self.storage.pop(name), requires_grad=self.meta[name].requires_grad)


def _shard_before_reading(model: nn.Module, dtype: torch.dtype) -> None:
    """FSDP2 over the process group before a weight is read: every decoder layer its own unit, then the root, all
    on the meta device; then each rank's shards get their memory (`to_empty`), which the load fills."""
    from torch.distributed.fsdp import fully_shard

    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if name.endswith(FP32_PARAMS) else dtype)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")


def _layer_prefix(name: str) -> str | None:
    """ "model.layers.3." for a parameter of decoder layer 3, else None."""
    if not name.startswith("model.layers."):
        return None
    return "model.layers." + name[len("model.layers.") :].split(".", 1)[0] + "."


def _region(t: torch.Tensor, slot) -> torch.Tensor:
    if slot is None:
        return t
    part, e, width = slot
    return {"gate": lambda: t[e, :width], "up": lambda: t[e, width:], "expert": lambda: t[e]}[part]()


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model`'s weights in `dtype`, the router's kept in fp32 (docs/architecture.md, pitfall 3)."""
    for name, p in model.named_parameters():
        p.data = p.data.float() if name.endswith(FP32_PARAMS) else p.data.to(dtype)
    model.config.dtype = dtype
    return model


def _rank(expert_shard: bool | tuple[int, int]) -> tuple[int, int]:
    if expert_shard is True:
        if not torch.distributed.is_initialized():
            raise ValueError("expert_shard=True: no process group (launch with torchrun and init_process_group "
                             "first), or give (rank, ranks)")  # fmt: skip
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, ranks = expert_shard
    if not 0 <= rank < ranks:
        raise ValueError(f"expert_shard: rank {rank} is not one of {ranks} ranks")
    return rank, ranks


def build_on_meta(config: Ernie45Config) -> Ernie45ForConditionalGeneration:
    """The model's structure with no memory behind it (for loading and for counting parameters)."""
    with torch.device("meta"):
        return Ernie45ForConditionalGeneration(config)


def _with_mtp(config: Ernie45Config, keys: list[str]) -> Ernie45ForConditionalGeneration:
    """The meta model, with MTP modules for the checkpoint's `mtp_*` weights when their names are those of the
    modules (a dense block: ours and the official layout's); otherwise without, the weights kept aside (logged)."""
    mtp = sorted(k for k in keys if SIDE_KEYS.search(k))
    depths = {int(m.group(1)) for k in mtp if (m := re.search(r"mtp_linear_proj\.(\d+)\.", k))}
    if mtp and depths == set(range(len(depths))):
        config.num_nextn_predict_layers = len(depths)
        model = build_on_meta(config)
        wanted = {n for n, _ in model.named_parameters() if ".mtp_" in n}
        if set(mtp) == wanted:
            return model
        log.info("the checkpoint's MTP weights (%d tensors) are in a layout ernie45 does not map (%s); kept aside "
                 "in model.mtp_state_dict, no MTP drafting", len(mtp), sorted(set(mtp) ^ wanted)[:3])  # fmt: skip
    config.num_nextn_predict_layers = 0
    return build_on_meta(config)


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    on_layer=None,
    expert_shard: bool | tuple[int, int] = False,
    fsdp: bool = False,
    zero3: dict | None = None,
    mmap: bool | None = None,
) -> Ernie45ForConditionalGeneration:
    """Load a checkpoint directory in any supported layout.

    dtype: the weights' dtype (default: as stored); the router always stays fp32.
    on_layer: called with each decoder layer once its weights are all read (e.g. to quantize it, so the whole
    model never exists in float: `runtime.prepare.QuantizingLoader`).
    expert_shard: expert parallelism (`runtime.expert_parallel`): this process holds and reads only its rank's share
    of every routed expert group: True takes (rank, ranks) from the torch.distributed process group.
    fsdp: FSDP2 training over the torch.distributed process group: each decoder layer is sharded (torch's
    `fully_shard`), and the rest (embeddings, encoders, head) as the root, on the meta device before any weight is
    read; each rank then fills only its own rows (experts outside them are not read), so a rank holds its shards
    and one checkpoint tensor in flight, never a whole layer.
    zero3: a DeepSpeed config (as the Trainer resolved it) for ZeRO-3 training: each decoder layer is partitioned
    over the ranks (`deepspeed.zero.Init` on the built layer) as soon as its weights are read, the rest at the end,
    as transformers' own loading does under ZeRO-3 for its classes.
    mmap: a quantized checkpoint loaded on the CPU maps its files and uses the int4 weights where they lie (a second
    start reads them from the page cache, and they take no memory of the process's own); False reads them in; True
    asks for the mapping and is refused where nothing would be mapped (a float checkpoint, another device).
    Multi-token-prediction (``mtp_*``) weights load into the model's MTP modules (``model.mtp_*``), which the engine's
    speculative decoding drafts with; a layout they do not map onto is kept aside in ``model.mtp_state_dict``.
    """
    from ..hub import NotFound, resolve

    try:
        path = resolve(path)  # a directory, or a hub id already in the local Hugging Face cache
    except NotFound as e:
        raise CheckpointError(f"{e} (a checkpoint directory holds config.json and weights)") from None
    config, model_type = read_config(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    quantized = bool(getattr(config, "ernie45_quantization", None))  # written by `ernie45 quantize`
    if mmap and not (quantized and (device is None or torch.device(device).type == "cpu")):
        raise ValueError("mmap=True: only a quantized checkpoint (`ernie45 quantize`) loaded on the CPU is mapped; "
                         f"{path} is {'quantized' if quantized else 'not quantized'} and the device is "
                         f"{device or 'cpu'} (leave mmap out, or False)")  # fmt: skip
    if quantized:
        from .quantized import load_quantized

        model = build_on_meta(config)
        load_quantized(path, model, dtype, device, mapped=mmap is not False)
        model.config.name_or_path = str(path)
        _generation_config(model, path)
        return model.eval()
    if (fsdp or zero3 is not None) and (on_layer is not None or expert_shard):
        raise ValueError(f"{'fsdp' if fsdp else 'zero3'}: the load shards every layer itself; it does not combine "
                         "with on_layer (a quantizing load) or expert_shard")  # fmt: skip
    shard = _sharder(fsdp, zero3)
    files, kind = weight_files(path, allow_pickle)
    tensors = list(iter_tensors(files, kind))
    model = _with_mtp(config, [t[0] for t in tensors])
    if fsdp:  # sharded before reading: each rank fills only its own rows
        stored = next((t[1] for t in tensors if t[1].is_floating_point and not t[0].endswith(FP32_PARAMS)),
                      torch.float32)  # fmt: skip
        _shard_before_reading(model, dtype or stored)
        shard = None
    on_layer = shard or on_layer
    if expert_shard:
        if on_layer is not None:
            raise ValueError("expert_shard: a quantizing (layer by layer) load keeps whole expert groups; load "
                             "the float model split, or quantize after splitting")  # fmt: skip
        rank, ranks = _rank(expert_shard)
        split_experts(model, rank, ranks)
    filler = _Filler(model, RULES_BY_MODEL_TYPE[model_type], dtype, device, on_layer)
    for key, t_dtype, shape, read in tqdm(tensors, desc=f"loading {path.name}", unit="tensor", disable=None):
        filler.put(key, t_dtype, shape, read)
    filler.finish()
    if shard is not None:
        shard(model)  # the root: what no decoder layer holds
    model.mtp_state_dict = filler.side
    stored = next((p.dtype for n, p in model.named_parameters() if p.is_floating_point()
                   and not n.endswith(FP32_PARAMS)), torch.float32)  # fmt: skip
    model.config.dtype = dtype or stored
    model.config.name_or_path = str(path)
    _generation_config(model, path)
    return model.eval()


def _sharder(fsdp: bool, zero3: dict | None):
    """What shards a module over the process group as the load reads it: FSDP2's `fully_shard`, or ZeRO-3's
    partitioning of an already built module; None for a whole model."""
    if fsdp and zero3 is not None:
        raise ValueError("fsdp and zero3: pick one way to shard the model")
    if not fsdp and zero3 is None:
        return None
    if not torch.distributed.is_initialized():
        raise ValueError(f"{'fsdp=True' if fsdp else 'zero3'}: no process group (launch with torchrun; the Trainer's "
                         "arguments or init_process_group start it)")  # fmt: skip
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        return fully_shard
    import deepspeed

    deepspeed.init_distributed()  # (over the torch process group: its config reads the world size from it)

    def partition(module: nn.Module) -> nn.Module:  # (params already partitioned are skipped: the root comes last)
        deepspeed.zero.Init(module=module, config_dict_or_path=zero3, mem_efficient_linear=False)
        return module

    return partition


def _generation_config(model, path: Path) -> None:
    """The checkpoint's generation_config.json (end ids, sampling defaults) for `model.generate`, as
    transformers' own loading reads it."""
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'generation_config.json'} could not be read ({e})") from None
