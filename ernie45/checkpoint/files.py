"""Finding a checkpoint's weight files and reading safetensors tensors straight into their destination.

The reader parses the safetensors header itself and ``readinto``s each tensor's bytes into the memory
that will hold it (a parameter, or its slice of a stacked expert tensor), so loading never keeps a
second copy of the weights: no intermediate state dict. A file whose tensors are used as stored (a quantized
checkpoint's int4 tiles) is mapped instead, and `view` gives its tensors over the mapping.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the key and what was expected."""


class SafetensorsFile:
    """One .safetensors file: its header, and tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: a {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            if not isinstance(e, dict):
                raise CheckpointError(f"{path}: the header entry of tensor {key} is not an object")
            dtype = DTYPES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {e.get('dtype')!r}")
            offsets, shape = e.get("data_offsets"), e.get("shape")
            if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
                raise CheckpointError(f"{path}: tensor {key} has no valid data_offsets (two byte offsets expected)")
            if not _ints(shape) or any(d < 0 for d in shape) or len(shape) > 8:
                raise CheckpointError(f"{path}: tensor {key} has an invalid shape {shape!r}")
            begin, end = offsets
            shape = tuple(shape)
            if self.base + end > size or end - begin != _numel(shape) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {key} lies outside the file or has the wrong byte size")
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_shape(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[key]
        return dtype, shape

    def read(self, key: str, out: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
        """The tensor `key`, or only its rows `rows` (a step-1 slice of the first dimension: one contiguous byte
        range, the rest of the file untouched); read directly into `out` (a contiguous CPU tensor of its dtype and
        that shape) if given."""
        dtype, shape, begin, end = self.entries[key]
        if rows is not None:
            lo, hi, step = rows.indices(shape[0] if shape else 0)
            if step != 1 or not shape:
                raise ValueError(f"{key}: rows must be a step-1 slice of the first dimension")
            row_bytes = _numel(shape[1:]) * dtype.itemsize
            hi = max(hi, lo)
            begin, end, shape = begin + lo * row_bytes, begin + hi * row_bytes, (hi - lo, *shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        assert out.is_contiguous() and out.dtype == dtype and tuple(out.shape) == shape
        if end > begin:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.base + begin)
                view = memoryview(out.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointError(f"{self.path}: file ended while reading {key}")
                    got += n
        return out

    def view(self, key: str, data: torch.Tensor) -> torch.Tensor | None:
        """The tensor `key` over `data`, this whole file's bytes mapped (`runtime.hugepages.map_file`): no copy, and
        no view either (a view's base would keep its bytes from being moved or freed alone). None where the tensor
        does not start at a multiple of its item size (a writer that did not align it: read it instead)."""
        dtype, shape, begin, _ = self.entries[key]
        start = self.base + begin
        if start % dtype.itemsize:
            return None
        return torch.empty(0, dtype=dtype).set_(data.untyped_storage(), start // dtype.itemsize, shape)


@contextmanager
def written_atomically(out: str | Path) -> Iterator[Path]:
    """A temporary directory inside `out` whose files replace `out`'s, each in one step (`os.replace`), when the
    block ends: processes writing the same files at once (the ranks of one run) never leave a reader a
    half-written file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".writing-") as tmp:
        yield Path(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)


def _ints(x: object) -> bool:
    """A JSON list of whole numbers (not booleans)."""
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    """The weight files of checkpoint directory `path` and their kind ("safetensors" or "pickle")."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a shard index with a weight_map ({type(e).__name__})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        shards = dict.fromkeys(weight_map.values())
        for shard in shards:  # a file name beside the index, never a path out of the directory
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(f"{index} names shard {shard!r}, which is not a file name in {path}")
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0]}, which is not in {path}")
        return [path / s for s in shards], "safetensors"
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    pickles = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle can run code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True if you trust the source."
            )
        return pickles, "pickle"
    raise CheckpointError(f"{path} has no weights: expected model.safetensors (or shards with an index)")


def iter_tensors(files: list[Path], kind: str) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], object]]:
    """(key, dtype, shape, reader) for every tensor; ``reader(out=None, rows=None)`` returns the tensor (or only
    the rows of its first dimension that the slice `rows` names)."""
    for file in files:
        if kind == "safetensors":
            st = SafetensorsFile(file)
            for key in st.keys():
                dtype, shape = st.dtype_shape(key)
                yield key, dtype, shape, (lambda out=None, rows=None, st=st, key=key: st.read(key, out, rows))
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for key, t in state.items():
                yield key, t.dtype, tuple(t.shape), (lambda out=None, rows=None, t=t: _rows_of(t, rows, out))


def _rows_of(t: torch.Tensor, rows: slice | None, out: torch.Tensor | None) -> torch.Tensor:
    t = t if rows is None else t[rows]
    return t if out is None else out.copy_(t)
