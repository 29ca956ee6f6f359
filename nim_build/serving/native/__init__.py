"""The native postprocessing backend (`detokenizer.cc`): compiled on first use, cached, and its token table.

`nim_build repo` puts the compiled library and the table of its tokenizer into the repository's
`postprocessing/1/` folder; Triton loads a backend from the model's version folder, so the repository needs
nothing installed in the server's backend directory. The library is built with the machine's C++ compiler
($CXX, else c++ / g++) into nim_build.paths.native_dir() ($NIM_BUILD_NATIVE_DIR, default ~/.cache/nim_build/native),
one build per source.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

from nim_build import paths
from nim_build.errors import NativeBuildError

BACKEND = "nim_detokenizer"
LIBRARY = f"libtriton_{BACKEND}.so"
TABLE_FILE = "detokenizer.bin"  # the name detokenizer.cc reads from the model's version folder
SOURCE = Path(__file__).with_name("detokenizer.cc")
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-Wall"]
_MAGIC = b"NIMDTOK1"


def build_detokenizer() -> Path:
    """The compiled backend library: from the cache, or compiled now (about 2 s) and cached."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = paths.native_dir() / digest / LIBRARY
    if out.is_file():
        return out
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise NativeBuildError(
            "no C++ compiler to build the native postprocessing backend: install g++ (or set "
            "CXX), or pass --postprocessing python"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only cache (an image's, under another user)
        raise NativeBuildError(
            f"cannot write the native postprocessing backend to {out.parent} ({e.strerror}): set "
            "NIM_BUILD_NATIVE_DIR to a writable folder, or pass --postprocessing python"
        ) from None
    tmp = out.with_name(f".{LIBRARY}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([*shlex.split(cxx), *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        failure = (proc.stderr.strip().splitlines() or ["no output"])[0] if proc.returncode else None
    except OSError as e:
        failure = e.strerror
    if failure:
        tmp.unlink(missing_ok=True)
        raise NativeBuildError(
            f"{cxx} could not build the native postprocessing backend ({failure}); pass --postprocessing python"
        )
    os.replace(tmp, out)
    return out


def write_table(path: Path, pieces: list[bytes], strip_leading_space: bool) -> None:
    """The token table detokenizer.cc loads: magic, flags, count, count + 1 offsets (u32 LE), then the bytes."""
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<II", int(strip_leading_space), len(pieces)))
        f.write(struct.pack(f"<{len(offsets)}I", *offsets))
        f.write(b"".join(pieces))
