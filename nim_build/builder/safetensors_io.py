"""Streaming safetensors I/O: read one tensor at a time from a (sharded) checkpoint, write one tensor at a time.

The writer lays out the whole file from a plan (names, dtypes, shapes) first, so each tensor can be written to
its final offset as soon as it is computed: memory stays bounded by the tensor in hand, never the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from nim_build.errors import CheckpointError
from nim_build.jsonfile import read_object

DTYPE_TO_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.int8: "I8",
    torch.uint8: "U8",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
INDEX_FILE = "model.safetensors.index.json"


# Bytes per element of every safetensors dtype (the format's own list); nim_build reads those in ST_TO_DTYPE.
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
MAX_HEADER_BYTES = 100 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header -> (tensor entries, start of the data section).

    Every entry is checked before a byte of data is read, as the safetensors library checks it: a known dtype, a
    shape of non-negative integers, integer offsets whose span is exactly the shape's bytes, and spans that tile
    the data section from 0 to the end of the file without gaps or overlaps. Any other file is a CheckpointError
    naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} has a corrupt header (length {n}, file {size} bytes); re-download it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, or nested past Python's recursion limit
            raise CheckpointError(f"{path} has a corrupt header (not a JSON object); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = sorted((_entry(path, name, info), name) for name, info in header.items())
    end = 0
    for (begin, stop), name in spans:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise CheckpointError(f"{path}: tensor {name!r} {what} (data_offsets start at {begin}, expected {end})")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or padded: its header describes {8 + n + end} bytes, the file "
            f"has {size}; re-download it"
        )
    return header, 8 + n


def _entry(path: Path, name: str, info) -> tuple[int, int]:
    """The (begin, end) data offsets of one header entry, after checking its dtype, shape and byte length."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: tensor {name!r} must have a dtype, a shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, stop = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if begin < 0 or stop - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans data_offsets {offsets}, but {dtype}{shape} is "
            f"{nbytes} bytes; the file is corrupt"
        )
    return begin, stop


class CheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory (single file or sharded with an index).

    Tensors are read with plain positioned reads, not mmap: mapped pages of a 25 GB input would count as the
    process's resident memory, read buffers are freed as soon as the tensor is converted.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_object(index).get("weight_map") or {}
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; re-download the model")
            for shard in set(weight_map.values()):
                if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                    raise CheckpointError(f"{index} names shard {shard!r}, which is not a file name in {self.dir}")
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise CheckpointError(
                        f"{index} names shard {shard!r}, which is missing from {self.dir}; "
                        "re-download the model (incomplete download?)"
                    )
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir} has no *.safetensors weights")
        self.files = [self.dir / f for f in files]
        # name -> (path, dtype, shape, absolute byte offset, nbytes)
        self._meta: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for path in self.files:
            header, data_start = read_header(path)
            for name, info in header.items():
                b, e = info["data_offsets"]
                self._meta[name] = (path, info["dtype"], info["shape"], data_start + b, e - b)
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> list[int]:
        return self._meta[self._require(name)][2]

    def dtype(self, name: str) -> str:
        """The safetensors dtype code ("BF16", "F32", ...)."""
        return self._meta[self._require(name)][1]

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, byte length) of a tensor's data: for copying its bytes unchanged."""
        path, _, _, offset, nbytes = self._meta[self._require(name)]
        return path, offset, nbytes

    def _require(self, name: str) -> str:
        if name not in self._meta:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        return name

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._meta[self._require(name)]
        if dtype not in ST_TO_DTYPE:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {dtype}, which nim_build does not read")
        with self._fds_lock:  # the read-ahead thread and the caller's both read
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            n = os.preadv(self._fds[path], [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path} ended early while reading {name}; re-download it")
            done += n
        return buf.view(ST_TO_DTYPE[dtype]).reshape(shape)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class StreamingWriter:
    """Writes a safetensors file whose layout is fixed up front; tensors arrive one at a time in any order, or, with
    hashed=True, in layout order, the file's sha256 computed as it is written (close() returns it)."""

    def __init__(
        self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict | None = None, hashed: bool = False
    ):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        header, offset = {}, 0
        for s in specs:
            header[s.name] = {
                "dtype": DTYPE_TO_ST[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._data_start = 8 + len(raw)
        self._offsets = {n: h["data_offsets"][0] for n, h in header.items() if n != "__metadata__"}
        self._pending = set(self.specs)
        self._f = open(self.path, "wb")
        head = struct.pack("<Q", len(raw)) + raw
        self._f.write(head)
        self._f.truncate(self._data_start + offset)
        self._sha = hashlib.sha256(head) if hashed else None
        self._next = self._data_start

    CAST_BLOCK_BYTES = 64 << 20

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a planned tensor; a floating-point one of another dtype is cast to the planned one in blocks of
        rows, so no whole copy of it is ever made."""
        spec = self.specs[name]
        castable = tensor.dtype.is_floating_point and spec.dtype.is_floating_point and tensor.dim() > 0
        if (tensor.dtype != spec.dtype and not castable) or tuple(tensor.shape) != spec.shape:
            raise AssertionError(
                f"{name}: planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        if name not in self._pending:
            raise AssertionError(f"{name} written twice")
        start = self._data_start + self._offsets[name]
        if self._sha is not None and start != self._next:
            raise AssertionError(f"{name}: a hashed file is written in layout order")
        self._f.seek(start)
        blocks = [tensor]
        if tensor.dtype != spec.dtype and tensor.dim() > 1 and spec.nbytes > self.CAST_BLOCK_BYTES:
            blocks = tensor.split(max(1, self.CAST_BLOCK_BYTES * spec.shape[0] // spec.nbytes))
        for block in blocks:
            data = block.to(spec.dtype).contiguous().view(torch.uint8).reshape(-1).numpy().data
            if self._sha is not None:
                self._sha.update(data)
            self._f.write(data)
        self._next = start + spec.nbytes
        self._pending.discard(name)

    def close(self) -> str | None:
        """Flush to disk; the file's sha256 when hashed."""
        if self._pending:
            raise AssertionError(f"{self.path.name}: tensors never written: {sorted(self._pending)[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest() if self._sha is not None else None
