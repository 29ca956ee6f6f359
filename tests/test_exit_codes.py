"""Exit codes of the real CLI (README): 0 ok, 2 bad input, 3 accuracy gate failed, 4 serving failed, 1 internal
error. Errors are one line on stderr without a traceback; NIM_BUILD_DEBUG=1 shows the traceback. The serving
failures (a stub that crashes, Triton exiting abnormally after SIGTERM, Triton killed) are in tests/test_serve.py
and tests/test_triton_supervision.py, which run a real server."""

from __future__ import annotations

import os
import subprocess
import sys


def nim_build(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nim_build", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.lstrip().startswith(("convert ", "backend:", "note:"))
    ]  # progress and notes come before the error
    assert "Traceback" not in proc.stderr and lines and lines[-1].startswith("Error: "), proc.stderr[-2000:]
    return lines[-1]


def test_bad_input_is_2(tmp_path):
    (tmp_path / "m").mkdir()
    proc = nim_build("engine", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "has no config.json" in one_error_line(proc)
    proc = nim_build("engine", str(tmp_path / "m"), "--quant", "fp9")  # a usage error: one line as well
    assert proc.returncode == 2 and "'fp9' is not one of" in one_error_line(proc)
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "build.yaml").write_text('model: default\nforce: "no"\n')  # a string is not a boolean
    proc = nim_build("engine", "--config", str(tmp_path / "build.yaml"))
    assert proc.returncode == 2 and "force: 'no' is not true or false" in one_error_line(proc)


def test_accuracy_gate_failure_is_3_and_leaves_no_engine(default_model_dir, tmp_path):
    proc = nim_build(
        "engine",
        str(default_model_dir),
        "--out",
        str(tmp_path / "eng"),
        "--backend",
        "reference",
        "--quant",
        "fp8-pc-pt",
        "--max-seq-len",
        "256",
        "--min-top1",
        "0.999",
    )
    assert proc.returncode == 3
    line = one_error_line(proc)
    assert line.startswith("Error: accuracy gate failed: top-1 agreement") and "--no-accuracy-gate" in line
    assert not (tmp_path / "eng").exists() and not list(tmp_path.iterdir())


def test_failed_inference_is_4_not_2():
    proc = nim_build("infer", "--url", "127.0.0.1:9", "--prompt", "hi", "--timeout", "5")
    assert proc.returncode == 4 and "Error: " in one_error_line(proc)


def test_debug_shows_the_traceback(tmp_path):
    proc = nim_build("engine", str(tmp_path), "--out", str(tmp_path / "o"), NIM_BUILD_DEBUG="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
