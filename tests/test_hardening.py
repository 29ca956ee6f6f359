"""Bad input, one case per test: exit code, exactly one line on stderr without a traceback, nothing created or
changed outside the output directory, an existing output untouched unless --force (a real boolean) is given, and
nothing complete-looking left behind. The cases are the ones an adversarial run against engine, repo and
cache-engine found (tests/test_safetensors_fuzz.py covers safetensors headers at large)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine_cli import _add_tokenizer
from tiny_models import make_slow_model, make_tiny_model

from nim_build.cli import main


def tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (or a link's target), so any change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def refused(capsys, root: Path, *args: str, match: str, code: int = 2, mid_run: bool = False) -> str:
    """Run the CLI in-process; assert it failed with `code`, one line naming `match`, and changed nothing under
    root (the output included: nothing half-written). Returns the line. mid_run: a failure during the work, after
    the build's log lines (the error is the last line, and the only one that says Error)."""
    before = tree(root)
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == code, err
    assert "Traceback" not in err and [ln for ln in lines if ln.startswith("Error: ")] == lines[-1:], err
    assert len(lines) == 1 or mid_run, err
    assert match in lines[-1], lines[-1]
    assert tree(root) == before, "something was created or changed"
    return lines[-1]


@pytest.fixture
def model(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "hf", hidden_size=64, num_heads=4, num_kv_heads=2)


def engine_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["engine", str(model), "--out", str(out), "--quant", "bf16", "--backend", "reference", *extra]


# -- 1. YAML values have their option's type ---------------------------------------------------------------------


def test_yaml_string_no_is_not_true_and_the_existing_output_survives(capsys, tmp_path, model):
    out = tmp_path / "eng"
    out.mkdir()
    (out / "user-data.txt").write_text("precious")
    (tmp_path / "build.yaml").write_text(f'model: {model}\nout: {out}\nquant: bf16\nforce: "no"\n')
    refused(capsys, tmp_path, "engine", "--config", str(tmp_path / "build.yaml"), match="force: 'no' is not true")


@pytest.mark.parametrize(
    "line, match",
    [
        ("tp: abc", "tp: 'abc' is not an integer"),
        ("max_batch_size: abc", "max_batch_size: 'abc' is not an integer"),
        ("max_seq_len: 1.5e3", "max_seq_len: '1.5e3' is not an integer"),
        ("max-seq-len: 1500.0", "max_seq_len: 1500.0 is not an integer"),
        ("min_top1: .nan", "min_top1: nan is not a finite number"),
        ("[1, 2]", "must be a mapping of option names to values"),
    ],
)
def test_yaml_value_of_the_wrong_type(capsys, tmp_path, model, line, match):
    (tmp_path / "build.yaml").write_text(line + "\n")
    refused(
        capsys, tmp_path, *engine_args(model, tmp_path / "eng"), "--config", str(tmp_path / "build.yaml"), match=match
    )


# -- 2. Triton model names are names, never paths ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    hf = make_tiny_model(root / "hf", hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    _add_tokenizer(hf)
    out = root / "eng"
    with pytest.raises(SystemExit) as e:
        main(engine_args(hf, out))
    assert e.value.code == 0
    return out


@pytest.mark.parametrize(
    "name, match",
    [
        ("../../../x", "is not a Triton model name"),
        ("preprocessing", "one of the repository's own models"),
        ("", "is not a Triton model name"),
        ("a/b", "is not a Triton model name"),
    ],
)
def test_repo_model_name_is_not_a_path(capsys, tmp_path, engine_dir, name, match):
    refused(
        capsys, tmp_path, "repo", str(engine_dir), "--out", str(tmp_path / "repo"), "--model-name", name, match=match
    )


# -- 3. links out of the model directory ------------------------------------------------------------------------


def test_checkpoint_file_linking_outside_the_model_is_refused(capsys, tmp_path, model):
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    (model / "tokenizer.model").symlink_to(secret)
    line = refused(capsys, tmp_path, *engine_args(model, tmp_path / "eng"), match="tokenizer.model links to")
    assert str(secret) in line


# -- 4. malformed safetensors -----------------------------------------------------------------------------------


def _weights_header(model: Path) -> tuple[dict, bytes]:
    raw = (model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(model: Path, header, data: bytes) -> None:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)


def _first(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize(
    "case, match",
    [
        ("negative offsets", "spans data_offsets"),
        ("reversed offsets", "spans data_offsets"),
        ("overlapping offsets", "overlaps the tensor before it"),
        ("short offsets", "spans data_offsets"),
        ("U8 weights", "model weights are BF16, F16, F32"),
        ("header is a list", "a JSON list, not an object"),
        ("header is a string", "a JSON str, not an object"),
        ("missing offsets", "must have a dtype, a shape"),
        ("string offsets", "expected [begin, end]"),
        ("200k-deep header", "not a JSON object"),
    ],
)
def test_malformed_safetensors(capsys, tmp_path, model, case, match):
    header, data = _weights_header(model)
    entries = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    e0, e1 = header[entries[0]], header[entries[1]]
    if case == "negative offsets":
        e1["data_offsets"] = [-8, e1["data_offsets"][1] - 8 - e1["data_offsets"][0]]
    elif case == "reversed offsets":
        e0["data_offsets"] = e0["data_offsets"][::-1]
    elif case == "overlapping offsets":
        e1["data_offsets"] = [e1["data_offsets"][0] - 2, e1["data_offsets"][1] - 2]
    elif case == "short offsets":
        e0["data_offsets"][1] -= 2
    elif case == "U8 weights":
        name = "model.layers.0.mlp.down_proj.weight"
        w = header[name]
        nbytes = w["data_offsets"][1] - w["data_offsets"][0]
        w["dtype"], w["shape"] = "U8", [nbytes]
    elif case == "header is a list":
        header = [1, 2]
    elif case == "header is a string":
        header = "weights"
    elif case == "missing offsets":
        del e0["data_offsets"]
    elif case == "string offsets":
        e0["data_offsets"] = [str(o) for o in e0["data_offsets"]]
    elif case == "200k-deep header":
        header = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    _rewrite(model, header, data)
    refused(capsys, tmp_path, *engine_args(model, tmp_path / "eng"), match=match)


# -- 5. config fields that shape the model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0; expected a whole number >= 1"),
        ({"num_hidden_layers": -1}, "num_hidden_layers is -1"),
        ({"hidden_size": "tiny"}, "hidden_size is 'tiny'"),
        ({"vocab_size": "abc"}, "vocab_size is 'abc'"),
        ({"rope_scaling": "linear"}, "rope_scaling is 'linear'"),
        ({"rms_norm_eps": -1}, "rms_norm_eps is -1; expected a positive number"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes'"),
    ],
)
def test_config_field_out_of_range_or_of_the_wrong_type(capsys, tmp_path, model, change, match):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    refused(capsys, tmp_path, *engine_args(model, tmp_path / "eng"), match=match)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"vocab_size": "\xff\xfe"}', "is not UTF-8 text"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b"[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_config_that_is_not_a_json_object(capsys, tmp_path, model, raw, match):
    (model / "config.json").write_bytes(raw)
    refused(capsys, tmp_path, *engine_args(model, tmp_path / "eng"), match=match)


# -- 6. repo: private temporary directories, a full disk, concurrent runs ---------------------------------------


def test_repo_on_a_full_disk_leaves_nothing(capsys, tmp_path, engine_dir, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "repo"))

    monkeypatch.setattr("nim_build.serving.repo.shutil.copytree", full)
    line = refused(
        capsys,
        tmp_path,
        "repo",
        str(engine_dir),
        "--postprocessing",
        "python",
        "--out",
        str(tmp_path / "repo"),
        code=5,
        match="no space left on device",
    )
    assert "write elsewhere" in line


def test_concurrent_repo_force_runs_are_serialized(tmp_path, engine_dir):
    out = tmp_path / "repo"
    cmd = [
        sys.executable,
        "-m",
        "nim_build",
        "repo",
        str(engine_dir),
        "--out",
        str(out),
        "--force",
        "--postprocessing",
        "python",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(5)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, errors
    assert sorted(os.listdir(tmp_path)) == ["repo"]  # no temporary sibling left
    assert sorted(os.listdir(out)) == [
        "ensemble",
        "postprocessing",
        "preprocessing",
        "tensorrt_llm",
        "tensorrt_llm_bls",
    ]
    assert all((out / m / "config.pbtxt").is_file() for m in os.listdir(out))


# -- 7, 8. revisions, hub ids and outputs -----------------------------------------------------------------------


def test_revision_that_is_a_path_is_refused_before_a_path_is_made(capsys, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not print me")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = refused(
        capsys,
        tmp_path,
        "cache-engine",
        "org/model",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--revision",
        "../../../../" + str(secret),
        match="is not a git commit, branch or tag name",
    )
    assert "do not print me" not in line
    refused(capsys, tmp_path, "engine", "org/model@../../x", "--out", str(tmp_path / "o"), match="is not a git commit")


@pytest.mark.parametrize("model_id", ["org/na me", "org/..x", "org/a/b"])
def test_hub_id_that_is_not_one(capsys, tmp_path, model_id):
    refused(capsys, tmp_path, "engine", model_id, "--out", str(tmp_path / "o"), match="nor a hub id")


def test_out_under_a_regular_file(capsys, tmp_path, model):
    (tmp_path / "file").write_text("x")
    refused(capsys, tmp_path, *engine_args(model, tmp_path / "file" / "eng"), match="is a file, not a directory")


def test_out_under_proc_is_the_machine_refusing(capsys, tmp_path, model):
    refused(capsys, tmp_path, *engine_args(model, Path("/proc/nim_build_eng")), code=5, match="/proc")


def test_out_dot_with_force_would_replace_the_working_directory(capsys, tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, *engine_args(model, Path("."), "--force"), match="would replace the working directory")
    refused(capsys, tmp_path, *engine_args(model, model, "--force"), match="would replace an input of this run")


def test_disk_too_small_for_the_build_is_one_line_before_writing(capsys, tmp_path, model, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("nim_build.outputs.shutil.disk_usage", lambda p: usage._replace(free=1 << 20))
    line = refused(capsys, tmp_path, *engine_args(model, tmp_path / "eng"), code=5, match="GiB free, and writing")
    assert "choose another --out" in line


def test_disk_full_during_the_build_leaves_nothing(capsys, tmp_path, model, monkeypatch):
    from nim_build.builder import safetensors_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", full)
    line = refused(
        capsys,
        tmp_path,
        *engine_args(model, tmp_path / "eng", "--json"),
        code=5,
        mid_run=True,
        match="no space left on device",
    )
    assert "write elsewhere (--out)" in line


# -- 9. a killed cache-engine leaves no build running -----------------------------------------------------------


def test_orphaned_cache_engine_build_dies_with_its_parent(tmp_path):
    import psutil

    model = make_slow_model(tmp_path / "hf")
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nim_build",
            "cache-engine",
            str(model),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quant",
            "bf16",
            "--backend",
            "reference",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def building() -> list:  # the child once it has exec'd `nim_build engine` (a forked one shows the parent's)
        found = []
        for c in psutil.Process(parent.pid).children():
            try:
                if "engine" in c.cmdline():
                    found.append(c)
            except psutil.Error:  # a short-lived child (a failed exec of nvidia-smi) is a zombie until reaped
                pass
        return found

    deadline = time.monotonic() + 60
    while not (children := building()):
        assert parent.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    (child,) = children
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, _ = psutil.wait_procs([child], timeout=3)  # at once with the fix; the build alone takes longer
    assert gone, "the build kept running after its cache-engine was killed"
