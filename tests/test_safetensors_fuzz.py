"""The safetensors header reader against the safetensors library, on a few hundred seeded random files: valid ones
and ones with one header field broken at a time (offsets negative, reversed, overlapping, gapped, past the end;
dtypes unknown or inconsistent with the bytes; shapes, keys and types wrong; headers that are lists, strings, not
UTF-8, nested 200k deep). Every file nim_build accepts, the library accepts too and both read the same tensors;
every file either rejects is a CheckpointError from nim_build (one clear message, never another exception)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from nim_build.builder.safetensors_io import CheckpointReader, read_header
from nim_build.errors import CheckpointError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "U8": torch.uint8}


def valid_file(rng: random.Random) -> tuple[dict, bytes]:
    """A header dict and the data section of a valid file with 1-4 random tensors."""
    header, data = {}, b""
    for i in range(rng.randint(1, 4)):
        dtype = rng.choice(list(DTYPES))
        shape = [rng.randint(0 if rng.random() < 0.1 else 1, 5) for _ in range(rng.randint(0, 3))]
        t = (torch.rand(shape) * 100).to(DTYPES[dtype])
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if rng.random() < 0.3:
        header["__metadata__"] = {"format": "pt"}
    return header, data


def mutate(rng: random.Random, header: dict, data: bytes) -> tuple[bytes, bytes]:
    """The header's bytes with one thing broken (or none, a fifth of the time), and the data section."""
    names = [n for n in header if n != "__metadata__"]
    entry = header[rng.choice(names)]
    case = rng.randrange(16)
    if case == 0:
        entry["data_offsets"][0] = -rng.randint(1, 8)
    elif case == 1:
        entry["data_offsets"] = entry["data_offsets"][::-1] if entry["data_offsets"][1] else [5, 1]
    elif case == 2:
        entry["data_offsets"][1] += rng.randint(1, 64)  # past its bytes (and maybe the file)
    elif case == 3 and len(names) > 1:
        other = header[names[0] if entry is not header[names[0]] else names[1]]
        entry["data_offsets"] = list(other["data_offsets"])  # overlapping another tensor
    elif case == 4:
        entry["dtype"] = rng.choice(["U8", "F64", "Q4", 7, None])
    elif case == 5:
        entry["shape"] = rng.choice([[-1], ["2"], "3", [1.5], [True], None])
    elif case == 6:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif case == 7:
        entry["data_offsets"] = rng.choice([["0", "4"], [0], 5, None, [0, 4, 8]])
    elif case == 8:
        return json.dumps(rng.choice([[1, 2], "header", 3, None])).encode(), data
    elif case == 9:
        return b'{"t0": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", data
    elif case == 10:
        return b'{"t0": "\xff\xfe"}', data
    elif case == 11:
        data = data[: rng.randrange(len(data))] if data else data + b"x"  # truncated (or padded) data section
    elif case == 12:
        header["__metadata__"] = rng.choice([{"a": 1}, "meta", [1]])
    elif case == 13:
        entry["extra"] = 1
    return json.dumps(header).encode(), data


def write(path: Path, head: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def library_reads(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, Exception):  # noqa: BLE001 - anything the library refuses
        return None


@pytest.mark.parametrize("seed", range(6))
def test_header_reader_agrees_with_the_safetensors_library(tmp_path, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    accepted = rejected = 0
    for case in range(50):
        head, data = mutate(rng, *valid_file(rng))
        path = write(tmp_path / f"c{case}.safetensors", head, data)
        theirs = library_reads(path)
        try:
            read_header(path)
        except CheckpointError as e:
            assert str(e) and "\n" not in str(e)
            assert theirs is None, f"nim_build refused what safetensors reads ({e})"
            rejected += 1
            continue
        accepted += 1
        assert theirs is not None, f"nim_build accepted what safetensors refuses: {head[:200]!r}"
        reader = _reader(path)
        try:
            for name, want in theirs.items():
                assert torch.equal(reader.get(name), want), name
        finally:
            reader.close()
    assert accepted and rejected  # both kinds were generated


def _reader(path: Path) -> CheckpointReader:
    """A reader over just this file."""
    d = path.parent / f"{path.stem}.d"
    d.mkdir()
    (d / "model.safetensors").symlink_to(path)
    return CheckpointReader(d)
