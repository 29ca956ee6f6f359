"""Where nim_build keeps what it caches on this machine (read from the environment here, nowhere else).

$NIM_BUILD_CACHE, else $XDG_CACHE_HOME/nim_build, else ~/.cache/nim_build:
    default-models/   the embedded default model as an HF checkpoint (nim_build.builder.default_model)
    native/           compiled native postprocessing backends ($NIM_BUILD_NATIVE_DIR overrides this one folder)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("NIM_BUILD_CACHE"):
        return Path(os.environ["NIM_BUILD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nim_build"


def default_models_dir() -> Path:
    return cache_root() / "default-models"


def native_dir() -> Path:
    return (
        Path(os.environ["NIM_BUILD_NATIVE_DIR"]) if os.environ.get("NIM_BUILD_NATIVE_DIR") else cache_root() / "native"
    )
