"""Resolving MODEL through huggingface_hub's real cache layout, offline (HF_HOME / HF_HUB_OFFLINE honoured)."""

import json
import os
import subprocess
import sys

from tiny_models import make_tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def run(args, hf_home, **env):
    full_env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", **env)
    full_env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "nim_build", *args], capture_output=True, text=True, env=full_env)


def test_offline_without_cached_copy_says_how_to_prefetch(tmp_path):
    done = run(["engine", "acme/missing-model", "--out", str(tmp_path / "o")], tmp_path / "hf")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: HF_HUB_OFFLINE is set and no cached copy of acme/missing-model exists; pre-fetch it on a connected "
        "machine with `hf download acme/missing-model` and copy the HF_HOME cache here"
    ]
    assert not (tmp_path / "o").exists()


def test_hub_id_with_revision_resolves_from_the_cache(tmp_path):
    """A snapshot laid out exactly as huggingface_hub caches it (refs/main -> snapshots/<sha>)."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny"
    make_tiny_model(repo / "snapshots" / SHA, hidden_size=80, num_heads=4, num_kv_heads=2, head_dim=16)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    out = tmp_path / "eng"
    done = run(
        ["engine", "acme/tiny@main", "--out", str(out), "--quant", "bf16", "--backend", "reference", "--json"],
        tmp_path / "hf",
    )
    assert done.returncode == 0, done.stderr
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["source"] == "acme/tiny@main" and model["revision"] == SHA


def test_local_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    done = run(["engine", str(tmp_path / "weights.gguf")], tmp_path / "hf")
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
    done = run(["engine", "not-a-dir-nor-hub-id"], tmp_path / "hf")
    assert done.returncode == 2 and "neither an existing directory nor a hub id" in done.stderr
