"""`nim_build chart` (values from a build manifest) and `nim_build cache-engine` (the chart's init step).

Most engine directories here are minimal (a manifest written with nim_build.builder.manifest.write_manifest and a few
bytes standing for the engine), so GPU builds can be described; one test uses a real build of the embedded model.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import yaml
from helm_tools import CHART, by_kind, one, render, validate

from nim_build import __version__, options
from nim_build.builder.manifest import MANIFEST, write_manifest
from nim_build.cli import main
from nim_build.deploy.cache import (
    detect_gpu_arch,
    engine_key,
    ensure_engine,
    local_fingerprint,
    resolve_revision,
    tensorrt_llm_version,
)
from nim_build.deploy.chart import chart_values
from nim_build.errors import UserError
from nim_build.options import BuildOptions

COMMIT = "0123456789abcdef0123456789abcdef01234567"
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "arch": "sm90"}


NEMO = {"num_hidden_layers": 40, "num_key_value_heads": 8, "head_size": 128}


def make_engine_dir(
    path: Path,
    *,
    tp=2,
    backend="trtllm",
    gpu=H100,
    source="mistralai/Mistral-Nemo-Instruct-2407",
    revision=COMMIT,
    engine_bytes=1 << 20,
    build_s=1800.0,
    peak_rss=40 << 30,
    spec=NEMO,
) -> Path:
    (path / "engine").mkdir(parents=True)
    (path / "engine" / "rank0.engine").write_bytes(b"\0" * engine_bytes)
    write_manifest(
        path,
        {
            "name": path.name,
            "backend": backend,
            "model": {
                "source": source,
                "revision": revision,
                "local_dir": "/models/x",
                "architecture": "MistralForCausalLM",
                "input_files": {},
            },
            "spec": spec,
            "build": {
                "quant": "fp8",
                "tp": tp,
                "pp": 1,
                "world_size": tp,
                "max_batch_size": 32,
                "max_seq_len": 16384,
                "options": {**BuildOptions(model=source, max_batch_size=32, max_seq_len=16384).portable(), "tp": tp},
            },
            "versions": {"nim_build": __version__, "tensorrt_llm": "1.2.0" if backend == "trtllm" else None},
            "gpu": gpu,
            "timings_s": {"total": build_s},
            "peak_rss_bytes": peak_rss,
            "accuracy": None,
        },
    )
    return path


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chart_values_render_and_validate(tmp_path, capsys, tp):
    engine = make_engine_dir(tmp_path / "nemo", tp=tp)
    out = tmp_path / "values.yaml"
    code, stdout, _ = run_cli("chart", str(engine), "--out", str(out), capsys=capsys)
    assert code == 0 and f"helm install RELEASE helm/nim-llm -f {out}" in stdout
    values = yaml.safe_load(out.read_text())
    assert "# Next: helm install nemo helm/nim-llm -f values.yaml" in out.read_text()
    assert values["engine"]["tensorParallelSize"] == tp
    assert values["model"] == {"id": "mistralai/Mistral-Nemo-Instruct-2407", "revision": COMMIT}
    assert values["gpu"]["products"][0] == "NVIDIA-H100-80GB-HBM3" and "NVIDIA-H200" in values["gpu"]["products"]
    assert values["shm"]["sizeLimit"] == f"{4 * tp}Gi"
    # memory: the build's peak RSS (40 GiB) x 1.25 + shm
    assert values["resources"]["requests"]["memory"] == f"{50 + 4 * tp}Gi"
    # startup budget: twice the 30 min build
    assert values["startupProbe"]["periodSeconds"] * values["startupProbe"]["failureThreshold"] == 3600

    objects = render(values)
    assert validate(objects) >= 3
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    main_c = pod["containers"][0]
    assert main_c["resources"]["limits"]["nvidia.com/gpu"] == tp
    assert main_c["resources"]["requests"]["memory"] == values["resources"]["requests"]["memory"]
    assert (
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
            "matchExpressions"
        ][0]["values"]
        == values["gpu"]["products"]
    )
    env = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    assert (env["NIM_MODEL"], env["NIM_MODEL_REVISION"]) == (values["model"]["id"], COMMIT)
    assert init_build_options(objects, values["model"]["id"]).tp == tp
    (pvc,) = by_kind(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == values["persistence"]["size"]


def test_chart_cpu_reference_engine(tmp_path):
    engine = make_engine_dir(
        tmp_path / "small",
        tp=1,
        backend="reference",
        gpu=None,
        source="default",
        revision=None,
        build_s=20,
        peak_rss=1 << 30,
        spec={"num_hidden_layers": 30, "num_key_value_heads": 3, "head_size": 64},
    )
    values, notes = chart_values(engine)
    assert values["gpu"] == {"enabled": False, "products": []}
    assert values["image"]["tag"] == f"{__version__}-cpu" and values["model"]["id"] == "default"
    assert values["startupProbe"]["periodSeconds"] * values["startupProbe"]["failureThreshold"] >= 600
    objects = render(values)
    validate(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod and any("CPU" in n for n in notes)


def test_chart_on_a_real_build_renders_and_validates(reference_engine_dir, tmp_path, capsys):
    """A real FP8 reference build of the embedded model's local checkpoint (session fixture) -> chart -> helm."""
    out = tmp_path / "values.yaml"
    code, _, err = run_cli("chart", str(reference_engine_dir), "--out", str(out), capsys=capsys)
    assert code == 0, err
    values = yaml.safe_load(out.read_text())
    assert values["model"]["id"] == "/opt/nim/cache/models/SmolLM2-135M-Instruct"  # a local checkpoint
    assert values["engine"]["quant"] == "fp8" and values["engine"]["maxSeqLen"] == 512
    assert values["engine"]["tensorParallelSize"] == 1 and values["gpu"]["enabled"] is False
    objects = render(values)
    assert validate(objects) >= 3
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["memory"] == values["resources"]["requests"]["memory"]


def test_chart_local_checkpoint_note(tmp_path):
    engine = make_engine_dir(tmp_path / "mine", source="/data/my-llama", revision=None)
    values, notes = chart_values(engine)
    assert values["model"]["id"] == "/opt/nim/cache/models/my-llama"
    assert any("copy it into the model cache volume" in n for n in notes)


def test_chart_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli("chart", str(tmp_path), "--out", str(tmp_path / "v.yaml"), capsys=capsys)
    assert code == 2 and "no manifest.json" in err and len(err.strip().splitlines()) == 1

    engine = make_engine_dir(tmp_path / "tp3", tp=3)
    code, _, err = run_cli("chart", str(engine), "--out", str(tmp_path / "v.yaml"), capsys=capsys)
    assert code == 2 and "tp: 3 is not one of 1, 2, 4, 8" in err and len(err.strip().splitlines()) == 1

    engine = make_engine_dir(tmp_path / "ok")
    (tmp_path / "exists.yaml").write_text("keep: me\n")
    code, _, err = run_cli("chart", str(engine), "--out", str(tmp_path / "exists.yaml"), capsys=capsys)
    assert code == 2 and "--force" in err and (tmp_path / "exists.yaml").read_text() == "keep: me\n"
    code, _, _ = run_cli("chart", str(engine), "--out", str(tmp_path / "exists.yaml"), "--force", capsys=capsys)
    assert code == 0 and "engine:" in (tmp_path / "exists.yaml").read_text()

    broken = make_engine_dir(tmp_path / "no-gpu", gpu=None)  # a trtllm engine must record its GPU
    with pytest.raises(UserError, match="records no GPU"):
        chart_values(broken)


# -- nim_build cache-engine: the chart's init step ---------------------------------------------------------------


def fake_build(model: str, out: Path, opts: BuildOptions, hf_cache: Path) -> None:
    """Stands for `nim_build engine`: slow enough for replicas to overlap; logs each build to a counter file."""
    with open(out.parents[2] / "builds.log", "a") as f:
        f.write(f"{model} {opts.tp}\n")
    time.sleep(0.3)
    out.mkdir()
    (out / "engine.bin").write_bytes(b"engine")
    write_manifest(out, {"name": out.name, "backend": opts.backend})


def _count_builds(cache: Path) -> int:
    log = cache / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def test_cache_builds_once_then_reuses(tmp_path):
    cache, model = tmp_path / "cache", _model_dir(tmp_path)
    req = BuildOptions(model=str(model), tp=2)
    first = ensure_engine(cache, req, gpu_arch="sm90", trtllm="1.2.0", build=fake_build)
    assert (first / MANIFEST).is_file() and first.parent == cache / "engines"
    assert first.name.startswith("model-fp8-tp2-sm90--")
    assert ensure_engine(cache, req, gpu_arch="sm90", trtllm="1.2.0", build=fake_build) == first
    assert _count_builds(cache) == 1
    # another GPU architecture or TensorRT-LLM version gets its own engine
    other_gpu = ensure_engine(cache, req, gpu_arch="sm89", trtllm="1.2.0", build=fake_build)
    other_trt = ensure_engine(cache, req, gpu_arch="sm90", trtllm="1.3.0", build=fake_build)
    assert len({first, other_gpu, other_trt}) == 3 and _count_builds(cache) == 3
    assert not list((cache / "engines").glob(".tmp-*"))


def test_cache_key_covers_inputs(tmp_path):
    base = BuildOptions(model="org/m")
    keys = {
        engine_key("org/m", COMMIT, base, "sm90", "1.2.0"),
        engine_key("org/m", COMMIT, base, "sm90", None),
        engine_key("org/m", COMMIT, base, "sm100", "1.2.0"),
        engine_key("org/m", "f" * 40, base, "sm90", "1.2.0"),
        engine_key("org/n", COMMIT, base, "sm90", "1.2.0"),
    }
    # every option that changes the engine changes the key; workers (how many builds run at once) does not
    changed = {
        "quant": "bf16",
        "kv_cache": "fp8",
        "tp": 4,
        "backend": "reference",
        "max_batch_size": 8,
        "max_seq_len": 4096,
        "max_num_tokens": 4096,
        "calib_samples": 8,
        "calib_seq_len": 64,
        "accuracy_gate": False,
        "min_top1": 0.5,
        "max_ppl_increase": 0.5,
        "allow_pickle": True,
    }
    assert set(changed) == {f.name for f in options.fields(portable=True) if f.metadata["key"]}
    for name, value in changed.items():
        keys.add(engine_key("org/m", COMMIT, base.replace(**{name: value}), "sm90", "1.2.0"))
    assert len(keys) == 5 + len(changed)
    assert engine_key("org/m", COMMIT, base.replace(workers=4), "sm90", "1.2.0") == engine_key(
        "org/m", COMMIT, BuildOptions(model="org/m"), "sm90", "1.2.0"
    )


def test_local_fingerprint_is_the_content_hashed_once(tmp_path, monkeypatch):
    """A fine-tune re-exported in place with the same file sizes is another model; a warm start reads nothing."""
    from nim_build.deploy import cache as cache_module

    model, hashes = _model_dir(tmp_path), tmp_path / "hashes.json"
    before = local_fingerprint(model, hashes)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # one byte of a weight, same size
        f.seek(size // 2)
        f.write(b"\x01")
    assert weights.stat().st_size == size
    after = local_fingerprint(model, hashes)
    assert after != before
    read = []
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: read.append(p) or "x")
    assert local_fingerprint(model, hashes) == after and read == []  # remembered by path, size, mtime, inode
    (model / "tokenizer.json").write_text("{}")  # a tokenizer file is an input too
    assert local_fingerprint(model, hashes) != after and read == [model / "tokenizer.json"]


def test_resolve_revision_offline_reads_cache_refs(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hf = tmp_path / "hf"
    refs = hf / "models--org--m" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT)
    assert resolve_revision("org/m", "main", hf) == COMMIT
    assert resolve_revision("org/m", "f" * 40, hf) == "f" * 40  # a commit needs no look-up
    with pytest.raises(UserError, match="offline mode and the cache has no org/m@v2"):
        resolve_revision("org/m", "v2", hf)


def _replica(cache: str, model: str, queue) -> None:
    queue.put(str(ensure_engine(cache, BuildOptions(model=model), gpu_arch="sm90", trtllm="1.2.0", build=fake_build)))


def test_replicas_starting_together_build_once(tmp_path):
    cache, model = tmp_path / "cache", _model_dir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(str(cache), str(model), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and _count_builds(cache) == 1
    assert (Path(paths.pop()) / "engine.bin").read_bytes() == b"engine"


def test_failed_or_raced_builds_leave_a_consistent_cache(tmp_path):
    cache, model = tmp_path / "cache", _model_dir(tmp_path)
    req = BuildOptions(model=str(model))

    def failing(model, out, req, hf_cache):
        out.mkdir()
        (out / "half.engine").write_bytes(b"partial")
        raise UserError("build failed")

    with pytest.raises(UserError, match="build failed"):
        ensure_engine(cache, req, gpu_arch="sm90", trtllm="1.2.0", build=failing)
    assert list((cache / "engines").iterdir()) == []  # no partial engine, no temp dir left

    def raced(model, out, req, hf_cache):  # another pod (ignoring the lock) finishes first
        fake_build(model, out, req, hf_cache)
        winner = out.parents[1] / out.name
        fake_build(model, winner, req, hf_cache)
        (winner / "engine.bin").write_bytes(b"winner")

    path = ensure_engine(cache, req, gpu_arch="sm90", trtllm="1.2.0", build=raced)
    assert (path / "engine.bin").read_bytes() == b"winner"
    assert [p.name for p in (cache / "engines").iterdir()] == [path.name]


def test_cache_engine_cli_prints_the_cached_engine(tmp_path, capsys):
    cache, model = tmp_path / "cache", _model_dir(tmp_path)
    expected = ensure_engine(
        cache,
        BuildOptions(model=str(model), tp=2),
        gpu_arch=detect_gpu_arch(),
        trtllm=tensorrt_llm_version(),
        build=fake_build,
    )
    code, out, err = run_cli("cache-engine", str(model), "--cache-dir", str(cache), "--tp", "2", capsys=capsys)
    assert code == 0 and out.strip() == str(expected) and "engine found in the cache" in err
    code, _, err = run_cli(
        "cache-engine",
        str(tmp_path / "nowhere" / "x"),
        "--cache-dir",
        str(cache),
        "--revision",
        COMMIT,
        "--tp",
        "3",
        capsys=capsys,
    )
    assert code == 2 and "'3' is not one of" in err and len(err.strip().splitlines()) == 1


# -- one declaration of the build options: YAML -> options -> cache-engine argv -> chart values -> options --------


def parse_cache_engine(argv: list[str], monkeypatch) -> BuildOptions:
    """What the real `nim_build cache-engine` click command makes of argv (its cache left out)."""
    from click.testing import CliRunner

    from nim_build.cli.cache_engine import command

    seen = []
    monkeypatch.setattr("nim_build.deploy.cache.ensure_engine", lambda cache, opts, revision: seen.append(opts) or "x")
    result = CliRunner().invoke(command, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def init_build_options(objects, model: str) -> BuildOptions:
    """The build options of the rendered init container: its script's arguments ("$@") parsed as its
    `nim_build cache-engine` call would parse them."""

    from nim_build.cli.cache_engine import command

    init = one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    script, _, *args = init["args"]
    assert (
        'nim_build cache-engine "$NIM_MODEL" --revision "$NIM_MODEL_REVISION" \\\n  --cache-dir "$NIM_CACHE_DIR" "$@"'
        in script
    )
    ctx = command.make_context("cache-engine", [model, "--cache-dir", "/opt/nim/cache", *args])
    return options.from_mapping(
        {"model": model, **{k: v for k, v in ctx.params.items() if k in {f.name for f in options.fields()}}}
    )


def test_every_option_round_trips_yaml_argv_chart(tmp_path, monkeypatch):
    every = {
        "quant": "fp8",
        "kv_cache": "fp8",
        "tp": 4,
        "backend": "reference",
        "max_batch_size": 7,
        "max_seq_len": 1000000,
        "max_num_tokens": 4096,
        "calib_samples": 5,
        "calib_seq_len": 77,
        "accuracy_gate": False,
        "min_top1": 0.25,
        "max_ppl_increase": 0.5,
        "allow_pickle": True,
        "workers": 3,
    }
    assert set(every) == {f.name for f in options.fields(portable=True)}, "a portable option is missing here"
    assert all(getattr(BuildOptions(model="m"), k) != v for k, v in every.items() if k != "quant")
    (tmp_path / "build.yaml").write_text(
        yaml.safe_dump({"model": "org/m", **{k.replace("_", "-"): v for k, v in every.items()}})
    )
    from_yaml = options.from_mapping(yaml.safe_load((tmp_path / "build.yaml").read_text()), "build.yaml")
    argv = options.to_argv(from_yaml)
    from_argv = parse_cache_engine(["org/m", "--cache-dir", str(tmp_path / "cache"), *argv], monkeypatch)
    chart = options.to_chart(from_argv)
    assert chart["tensorParallelSize"] == 4 and chart["kvCache"] == "fp8" and chart["maxNumTokens"] == 4096
    from_chart = options.from_chart("org/m", chart)
    assert from_yaml == from_argv == from_chart == BuildOptions(model="org/m", **every)
    # ...and through the real chart: the rendered init container builds exactly these options
    values = {
        "model": {"id": "org/m", "revision": COMMIT},
        "engine": chart,
        "gpu": {"enabled": False},
        "image": {"tag": "0.1.0-cpu"},
    }
    assert init_build_options(render(values), "org/m") == from_chart


def test_chart_of_a_build_makes_the_init_container_run_the_same_build(tmp_path, capsys):
    """`nim_build chart` on a real `--kv-cache fp8 --max-num-tokens 4096` build: the init container's cache-engine
    call parses to the build's own options (backend resolved), so its cache key (options.cache_key_fields) is the
    build's: before, the chart could not carry these two, and the node built another engine."""
    from test_engine_cli import _add_tokenizer
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "hf", vocab_size=512)
    _add_tokenizer(model)
    out = tmp_path / "eng"
    code, _, err = run_cli(
        "engine",
        str(model),
        "--out",
        str(out),
        "--backend",
        "reference",
        "--kv-cache",
        "fp8",
        "--max-num-tokens",
        "4096",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--no-accuracy-gate",
        capsys=capsys,
    )
    assert code == 0, err
    code, _, err = run_cli("chart", str(out), "--out", str(tmp_path / "values.yaml"), capsys=capsys)
    assert code == 0, err
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["engine"]["kvCache"] == "fp8" and values["engine"]["maxNumTokens"] == 4096
    built = BuildOptions(
        model=str(model), **__import__("json").loads((out / "manifest.json").read_text())["build"]["options"]
    ).replace(backend="reference")
    assert init_build_options(render(values), str(model)) == built  # and so the same cache key


def test_chart_engine_values_are_generated_from_the_declaration():
    """values.yaml's engine block, values.schema.json's engine section, the README rows and templates/_engine.tpl
    are what nim_build.deploy.chart_sync derives from nim_build/options.py."""
    from nim_build.deploy import chart_sync

    assert chart_sync.main([str(CHART), "--check"]) == 0
