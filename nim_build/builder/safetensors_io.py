"""Streaming safetensors I/O: read one tensor at a time from a (sharded) checkpoint, write one tensor at a time.

The writer lays out the whole file from a plan (names, dtypes, shapes) first, so each tensor can be written to
its final offset as soon as it is computed: memory stays bounded by the tensor in hand, never the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from nim_build.errors import CheckpointError

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


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header -> (tensor entries, start of the data section).

    A truncated or corrupt file is a CheckpointError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path} has a corrupt header (length {n}, file {size} bytes); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt header; re-download it") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}; re-download it"
        )
    return header, 8 + n


class CheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory (single file or sharded with an index).

    Tensors are read with plain positioned reads, not mmap: mapped pages of a 25 GB input would count as the
    process's resident memory, read buffers are freed as soon as the tensor is converted.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            if not weight_map:
                raise CheckpointError(f"{index} has no weight_map; re-download the model")
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
                if info["dtype"] not in ST_TO_DTYPE:
                    raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
                b, e = info["data_offsets"]
                self._meta[name] = (path, info["dtype"], info["shape"], data_start + b, e - b)
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> list[int]:
        return self._meta[self._require(name)][2]

    def _require(self, name: str) -> str:
        if name not in self._meta:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        return name

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._meta[self._require(name)]
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
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class StreamingWriter:
    """Writes a safetensors file whose layout is fixed up front; tensors arrive one at a time in any order."""

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict | None = None):
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
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(
                f"{name}: planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        if name not in self._pending:
            raise AssertionError(f"{name} written twice")
        self._f.seek(self._data_start + self._offsets[name])
        self._f.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path.name}: tensors never written: {sorted(self._pending)[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
