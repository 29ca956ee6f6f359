"""Which engine backend builds and serves: `trtllm` (TensorRT-LLM 1.2 engine) or `reference` (the checkpoint itself,
run by nim_build's PyTorch runtime). `--backend auto` takes trtllm when this machine can build it and says why not
otherwise; `--backend trtllm` on a machine that cannot fails with the image and the command to run there.
`onnx` (asked for by name only) adds the checkpoint's ONNX graph (onnx_export.py); Triton does not serve it yet."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

from nim_build import TRTLLM_IMAGE
from nim_build.errors import BackendUnavailableError, ConfigError
from nim_build.options import BACKENDS, FP8_QUANTS


def trtllm_command(argv: Sequence[str] | None) -> str:
    """The user's own command with `--backend trtllm`, run in the TensorRT-LLM 1.2 serving image."""
    args = list(argv) if argv else ["engine", "MODEL", "--out", "DIR"]
    kept, i = [], 0
    while i < len(args):
        if args[i] == "--backend":
            i += 2
            continue
        if not args[i].startswith("--backend="):
            kept.append(args[i])
        i += 1
    kept += ["--backend", "trtllm"]
    return f'docker run --rm --gpus all -v "$PWD":/work -w /work {TRTLLM_IMAGE} nim_build {shlex.join(kept)}'


def _problem(probe, quant: str) -> str | None:
    """Why TensorRT-LLM cannot build this engine here, or None when it can."""
    if not probe.available:
        return probe.reason
    if quant in FP8_QUANTS and not probe.fp8_capable:
        major, minor = probe.compute_capability
        return (
            f"{quant} needs a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); "
            f"{probe.gpu_name} has {major}.{minor}"
        )
    return None


def choose_backend(
    requested: str, quant: str, *, argv: Sequence[str] | None = None, probe: Callable | None = None
) -> tuple[str, str]:
    """(backend, reason). argv: the user's command line after `nim_build`, reproduced in the messages."""
    if requested not in BACKENDS:
        raise ConfigError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested in ("reference", "onnx"):
        return requested, f"requested with --backend {requested}"
    if probe is None:
        from nim_build.builder.trtllm_adapter import probe
    found = probe()
    problem = _problem(found, quant)
    if problem is None:
        major, minor = found.compute_capability
        where = f"TensorRT-LLM {found.version} on {found.gpu_name} (compute capability {major}.{minor})"
        return "trtllm", (
            f"requested with --backend trtllm: {where}"
            if requested == "trtllm"
            else f"auto: {where} can build the engine"
        )
    need = "a GPU of compute capability >= 8.9" if quant in FP8_QUANTS else "a CUDA GPU"
    if requested == "trtllm":
        raise BackendUnavailableError(
            f"--backend trtllm cannot build here: {problem}. Build the engine in {TRTLLM_IMAGE} on {need}: "
            f"{trtllm_command(argv)}"
        )
    return "reference", (
        f"auto: {problem}, so nim_build's PyTorch runtime serves the checkpoint; for a TensorRT "
        f"engine run this on {need}: {trtllm_command(argv)}"
    )
