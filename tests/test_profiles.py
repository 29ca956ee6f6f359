"""Profiles, their selection on simulated nodes, and the model store (nim_build.deploy.profiles / store).

The planning golden uses Mistral NeMo 12B's real config.json (tests/fixtures/mistral-nemo-12b, no weights); sizes
come from the converter's own plan, which tests/test_convert.py checks against what it writes. Store tests use a
build function that writes a minimal engine directory, except the air-gapped test at the end, which builds the
embedded model with the real `nim_build engine` from a huggingface_hub cache with the network refused, and serves
the store with the real Triton server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ServedRepo, free_ports
from test_chart_cmd import run_cli

from nim_build.builder.manifest import MANIFEST, write_manifest
from nim_build.builder.spec import parse_config
from nim_build.deploy import profiles as P
from nim_build.deploy import store as S
from nim_build.errors import UserError
from nim_build.options import BuildOptions

NEMO_DIR = Path(__file__).parent / "fixtures" / "mistral-nemo-12b"
NEMO = parse_config(json.loads((NEMO_DIR / "config.json").read_text()))
NODES = ("H100-SXM x8", "L40S x2", "A100-80GB x4", "cpu")


def _planned(node: str, max_seq_len: int = 8192) -> dict[str, P.Planned]:
    return {pl.profile.name: pl for pl in P.plan(NEMO, P.parse_node(node), max_seq_len)}


# -- planning ----------------------------------------------------------------------------------------------------


def test_nemo_profiles_golden(capsys):
    """`nim_build profiles` on NeMo 12B's real config for four nodes, as reviewed in profiles.golden (regenerate:
    for g in "H100-SXM x8" "L40S x2" "A100-80GB x4" cpu; do nim_build profiles tests/fixtures/mistral-nemo-12b
    --gpus "$g"; done > tests/fixtures/mistral-nemo-12b/profiles.golden)."""
    out = ""
    for node in NODES:
        code, stdout, _ = run_cli("profiles", str(NEMO_DIR), "--gpus", node, capsys=capsys)
        assert code == 0
        out += stdout
    assert out == (NEMO_DIR / "profiles.golden").read_text()


def test_nemo_profiles_reasons():
    """The facts the golden shows, one by one."""
    a100 = _planned("A100-80GB x4")
    assert a100["trtllm-a100-80gb-fp8-tp1-throughput"].reasons == [
        "FP8 needs compute capability >= 8.9; A100-80GB has 8.0"
    ]
    assert a100["trtllm-a100-80gb-bf16-tp1-throughput"].runnable
    assert a100["trtllm-a100-80gb-bf16-tp8-latency"].reasons == ["tp 8 needs 8 GPUs; the node has 4"]
    l40s = _planned("L40S x2")
    # 12.2B parameters in bf16: 22.8 GiB, more than half of an L40S's usable 40.5 GiB; two of them hold it
    assert "more than 50% of the 40.5 GiB usable" in l40s["trtllm-l40s-bf16-tp1-throughput"].reasons[0]
    assert l40s["trtllm-l40s-bf16-tp2-throughput"].runnable
    assert l40s["trtllm-l40s-fp8-tp1-throughput"].runnable  # FP8 halves the weights: one L40S
    assert l40s["trtllm-l40s-fp8-tp8-latency"].reasons == ["tp 8 needs 8 GPUs; the node has 2"]
    # bf16: embedding + lm_head 2 x 131072 x 5120, 40 layers of 272.64M (qkv 6144 x 5120, dense, 3 MLP, 2 norms),
    # ln_f: 12.25B parameters; tp 2 splits all but the 81 norms, which both ranks hold
    weights = [pl.weights_per_gpu for pl in l40s.values() if pl.profile.precision == "bf16"][:2]
    assert weights == [2 * (2 * 131072 * 5120 + 40 * 272_640_000 + 5120), (24_495_564_800 + 81 * 10240) // 2]
    # KV cache: 2 (K, V) x 40 layers x 8 heads x 128 x 2 bytes = 160 KiB a token; FP8 halves it
    assert l40s["trtllm-l40s-bf16-tp2-throughput"].kv_bytes_per_token == 160 * 1024 // 2
    assert l40s["trtllm-l40s-fp8-fp8kv-tp1-throughput"].kv_bytes_per_token == 80 * 1024
    cpu = _planned("cpu")
    assert sorted(cpu) == ["reference-cpu-bf16-tp1", "reference-cpu-fp8-tp1"] and all(
        pl.runnable for pl in cpu.values()
    )
    # a long context: one 1M-token sequence's KV cache (160 GiB) fits on no GPU
    long = _planned("H100-SXM x8", max_seq_len=1_024_000)
    assert not long["trtllm-h100-sxm-bf16-tp1-throughput"].runnable
    assert "sequence's KV cache" in long["trtllm-h100-sxm-bf16-tp1-throughput"].reasons[0]


def test_a_tp_that_does_not_divide_the_heads_is_not_a_profile():
    spec = parse_config(
        dict(json.loads((NEMO_DIR / "config.json").read_text()), num_attention_heads=12, num_key_value_heads=4)
    )
    assert {pl.profile.tp for pl in P.plan(spec, P.parse_node("H100-SXM x8"), 8192)} == {1, 2, 4}


def test_profile_ids_are_stable_and_cover_every_option():
    p = P.Profile("trtllm", "fp8", "auto", 2, "H100-SXM", "latency", {"max_seq_len": 8192})
    assert p.name == "trtllm-h100-sxm-fp8-tp2-latency"
    assert p.id == P.Profile("trtllm", "fp8", "auto", 2, "H100-SXM", "latency", {"max_seq_len": 8192}).id
    assert p.id != P.Profile("trtllm", "fp8", "auto", 2, "H100-SXM", "latency", {"max_seq_len": 4096}).id
    assert P.profile_from_dict({**p.to_dict(), "build": p.build}) == p
    with pytest.raises(UserError, match="does not match its options"):
        P.profile_from_dict({**p.to_dict(), "tp": 4, "build": p.build})


def test_node_descriptions_and_detection():
    assert P.parse_node("h100-sxm x8") == P.Node(P.GPU_PRODUCTS["h100-sxm"], 8)
    assert P.parse_node("L40S") == P.Node(P.GPU_PRODUCTS["l40s"], 1)
    assert P.parse_node("cpu") == P.Node()
    for bad, why in [("H100-SXM x0", "at least one GPU"), ("V100 x2", "unknown GPU 'V100'"), ("8 x H100", "expected")]:
        with pytest.raises(UserError, match=why):
            P.parse_node(bad)
    smi = "NVIDIA H100 80GB HBM3, 81559, 9.0\n" * 4
    node = P.detect_node("auto", smi_output=smi)
    assert (node.gpu.name, node.count, node.gpu.arch) == ("H100-SXM", 4, "sm90") and node.cpu_memory > 0
    other = P.detect_node(None, smi_output="NVIDIA RTX 6000 Ada Generation, 49140, 8.9\n")
    assert (other.gpu.name, other.gpu.memory_mib, other.gpu.compute_capability) == (
        "RTX-6000-Ada-Generation",
        49140,
        (8, 9),
    )
    with pytest.raises(UserError, match="the node's GPUs differ"):
        P.detect_node(None, smi_output="NVIDIA L4, 23034, 8.9\nNVIDIA L40S, 46068, 8.9\n")
    assert P.detect_node(None, smi_output="").gpu is None


def test_the_node_description_env_replaces_detection(monkeypatch):
    monkeypatch.setenv(P.GPUS_ENV, "L40S x2")
    assert P.detect_node() == P.Node(P.GPU_PRODUCTS["l40s"], 2)
    assert P.detect_node("cpu") == P.Node()  # an explicit description wins


# -- selection: one test per rule --------------------------------------------------------------------------------


def _select(node: str, goal: str = "throughput", override: str | None = None, drop=()):
    planned = [pl for pl in P.plan(NEMO, P.parse_node(node), 8192) if pl.profile.name not in drop]
    chosen, rejected = P.select(planned, goal, override)
    return chosen.name, dict((p.name, why) for p, why in rejected)


def test_selection_takes_only_runnable_profiles():
    chosen, rejected = _select("A100-80GB x4")
    assert chosen == "trtllm-a100-80gb-bf16-tp1-throughput"
    assert rejected["trtllm-a100-80gb-fp8-fp8kv-tp1-throughput"].startswith("FP8 needs compute capability")


def test_selection_prefers_trtllm_to_reference():
    chosen, rejected = _select("H100-SXM x8")
    assert chosen.startswith("trtllm-")
    assert rejected["reference-cpu-fp8-tp1"] == "trtllm is preferred to reference"


def test_selection_prefers_lower_precision():
    chosen, rejected = _select("H100-SXM x8")
    assert chosen == "trtllm-h100-sxm-fp8-fp8kv-tp1-throughput"
    assert rejected["trtllm-h100-sxm-fp8-tp1-throughput"] == "fp8-fp8kv is preferred to fp8 (lower precision first)"
    no_fp8kv = [n for n in _planned("H100-SXM x8") if "fp8kv" in n]
    assert _select("H100-SXM x8", drop=no_fp8kv)[0] == "trtllm-h100-sxm-fp8-tp1-throughput"


def test_selection_follows_the_goal_and_takes_more_gpus_for_latency():
    assert _select("H100-SXM x8", "latency")[0] == "trtllm-h100-sxm-fp8-fp8kv-tp8-latency"
    chosen, rejected = _select("H100-SXM x2", "latency")
    assert chosen == "trtllm-h100-sxm-fp8-fp8kv-tp2-latency"
    assert rejected["trtllm-h100-sxm-fp8-fp8kv-tp1-throughput"] == "the goal is latency, this profile's throughput"
    chosen, rejected = _select("L40S x2", drop=["trtllm-l40s-fp8-fp8kv-tp1-throughput"])
    assert chosen == "trtllm-l40s-fp8-fp8kv-tp2-latency"  # no throughput profile of that precision is left
    # among throughput profiles of one precision, the fewest GPUs
    chosen, rejected = _select("L40S x2", drop=[n for n in _planned("L40S x2") if "fp8" in n])
    assert chosen == "trtllm-l40s-bf16-tp2-throughput"


def test_selection_override_by_name_or_id_and_its_errors():
    by_name = _select("L40S x2", override="trtllm-l40s-bf16-tp2-throughput")
    assert by_name[0] == "trtllm-l40s-bf16-tp2-throughput"
    assert by_name[1]["trtllm-l40s-fp8-tp1-throughput"] == "profile trtllm-l40s-bf16-tp2-throughput was asked for"
    pid = _planned("L40S x2")["trtllm-l40s-fp8-tp2-latency"].profile.id
    assert _select("L40S x2", override=pid)[0] == "trtllm-l40s-fp8-tp2-latency"
    with pytest.raises(UserError, match="cannot run on this node: tp 4 needs 4 GPUs; the node has 2"):
        _select("L40S x2", override="trtllm-l40s-bf16-tp4-latency")
    with pytest.raises(UserError, match="no profile 'trtllm-h100' here; the profiles are: trtllm-l40s-"):
        _select("L40S x2", override="trtllm-h100")
    with pytest.raises(UserError, match="goal 'fastest' is not one of throughput, latency"):
        _select("L40S x2", goal="fastest")


# -- the store, with a build that writes a minimal engine directory ------------------------------------------------


def fake_build(model: str, out: Path, opts: BuildOptions, hf_cache, name) -> None:
    """Stands for `nim_build engine`: an engine directory with a tokenizer and a manifest, the build logged."""
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text('{"stands": "for a tokenizer"}')
    (out / "engine.bin").write_bytes(f"{opts.backend} {opts.quant} {opts.tp}".encode())
    with open(out.parents[3] / "builds.log", "a") as f:
        f.write(f"{name} {opts.backend} {opts.quant} {opts.tp} {opts.max_seq_len}\n")
    write_manifest(out, {"name": name, "backend": opts.backend})


@pytest.fixture
def opts(default_model_dir):
    return BuildOptions(model=str(default_model_dir), max_seq_len=512, accuracy_gate=False)


def test_store_builds_what_runs_here_and_lists_gpu_profiles_for_the_node(tmp_path, opts):
    root = tmp_path / "store"
    store = S.build_store(opts.model, root, opts, P.parse_node("L40S x1"), all_runnable=True, build=fake_build)
    status = {e.profile.name: e.status for e in store.entries}
    assert status == {
        "trtllm-l40s-fp8-fp8kv-tp1-throughput": S.ON_NODE,  # no GPU and no TensorRT-LLM here
        "trtllm-l40s-fp8-tp1-throughput": S.ON_NODE,
        "trtllm-l40s-bf16-tp1-throughput": S.ON_NODE,
        "reference-cpu-fp8-tp1": S.BUILT,
        "reference-cpu-bf16-tp1": S.BUILT,
    }
    assert (tmp_path / "builds.log").read_text().splitlines() == [
        "SmolLM2-135M-Instruct reference fp8 1 512",
        "SmolLM2-135M-Instruct reference bf16 1 512",
    ]
    reloaded = S.load_store(root)
    assert [(e.profile, e.status) for e in reloaded.entries] == [(e.profile, e.status) for e in store.entries]
    fp8 = next(e.profile for e in reloaded.entries if e.profile.name == "reference-cpu-fp8-tp1")
    assert (root / "profiles" / fp8.id / MANIFEST).is_file() and fp8.build["max_seq_len"] == 512
    # the tokenizer is stored once: both profiles' files are links to STORE/tokenizer's
    links = {
        os.stat(root / "profiles" / e.profile.id / "tokenizer" / "tokenizer.json").st_ino
        for e in reloaded.entries
        if e.status == S.BUILT
    }
    assert links == {os.stat(root / "tokenizer" / "tokenizer.json").st_ino}
    # choosing on this CPU node: fp8, every other profile with its reason
    profile, path = S.choose(root, P.Node())
    assert profile.name == "reference-cpu-fp8-tp1" and path == root / "profiles" / fp8.id
    # on an L40S node the store's trtllm profile is chosen, and is refused here: it must build on that node
    with pytest.raises(UserError, match="trtllm-l40s-fp8-fp8kv-tp1-throughput is not built in .* TensorRT-LLM"):
        S.choose(root, P.parse_node("L40S x1"), build=fake_build)
    # adding to the store: same model and options only; a profile already built is not built again
    S.build_store(opts.model, root, opts, P.Node(), ["reference-cpu-fp8-tp1"], build=fake_build)
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="with other build options"):
        S.build_store(opts.model, root, opts.replace(max_seq_len=256), P.Node(), build=fake_build)
    with pytest.raises(UserError, match="cannot run on cpu: "):
        S.build_store(opts.model, root, opts, P.Node(cpu_memory=1 << 20), ["reference-cpu-bf16-tp1"], build=fake_build)


def test_store_without_a_runnable_profile_builds_the_best_one_on_the_node(tmp_path, opts):
    root = tmp_path / "store"
    S.build_store(
        opts.model, root, opts, P.parse_node("H100-SXM x1"), ["trtllm-h100-sxm-bf16-tp1-throughput"], build=fake_build
    )
    assert not (tmp_path / "builds.log").exists()  # listed for the node, not built here
    profile, path = S.choose(root, P.Node(), build=fake_build)  # a CPU node: nothing stored runs here
    assert profile.name == "reference-cpu-fp8-tp1" and (path / MANIFEST).is_file()
    assert [e.status for e in S.load_store(root).entries] == [S.ON_NODE, S.BUILT]
    assert (
        S.choose(root, P.Node(), override="reference-cpu-bf16-tp1", build=fake_build)[0].name
        == "reference-cpu-bf16-tp1"
    )
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 2


def test_a_failed_profile_build_leaves_the_store_as_it_was(tmp_path, opts):
    root = tmp_path / "store"
    S.build_store(opts.model, root, opts, P.Node(), ["reference-cpu-fp8-tp1"], build=fake_build)
    before = (root / S.STORE_MANIFEST).read_text()

    def dies(model, out, opts, hf_cache, name):
        (out / "half-written").mkdir(parents=True)
        raise UserError("the build failed")

    with pytest.raises(UserError, match="the build failed"):
        S.build_store(opts.model, root, opts, P.Node(), ["reference-cpu-bf16-tp1"], build=dies)
    assert (root / S.STORE_MANIFEST).read_text() == before
    assert sorted(p.name for p in (root / "profiles").iterdir()) == [S.load_store(root).entries[0].profile.id]


def test_profile_flags_apply_to_stores_only(tmp_path, opts, capsys):
    code, _, err = run_cli("serve", str(tmp_path), "--profile", "x", capsys=capsys)
    assert code == 2 and "--profile / NIM_BUILD_PROFILE applies to a model store" in err
    code, _, err = run_cli("repo", str(tmp_path), "--out", str(tmp_path / "r"), "--profile", "x", capsys=capsys)
    assert code == 2 and "--profile applies to a model store" in err


# -- air-gapped: a pre-downloaded hub cache, the network refused, the real build and the real server ----------------

COMMIT = "5f1b6f0c0ffee0c0ffee0c0ffee0c0ffee0c0ffe"
HUB_ID = "nim-build-test/smollm2"


def hub_cache(root: Path, model_dir: Path) -> Path:
    """A huggingface_hub cache holding model_dir as HUB_ID at COMMIT, laid out as `hf download` leaves it: blobs by
    hash, snapshot files linking to them, refs/main naming the commit."""
    import hashlib

    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_air_gapped_store_build_interrupted_resumed_and_served(tmp_path, default_model_dir):
    """download (offline: verify) -> store (killed, then resumed) -> serve STORE, with HF_HUB_OFFLINE=1 and a hub
    endpoint that refuses connections; a file missing from the cache is one line naming it."""
    cache = hub_cache(tmp_path / "hf", default_model_dir)
    (closed,) = free_ports(1)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
    }
    env.pop(P.GPUS_ENV, None)  # the node as detected: this CPU machine (and its memory)
    nim = [sys.executable, "-m", "nim_build"]

    def run(*args, environ=env):
        return subprocess.run([*nim, *args], env=environ, capture_output=True, text=True, timeout=300)

    done = run("download", HUB_ID, "--cache", str(cache))
    assert done.returncode == 0 and done.stdout.strip().endswith(f"snapshots/{COMMIT}"), done.stderr

    root = tmp_path / "store"
    argv = [
        *nim,
        "store",
        HUB_ID,
        "--out",
        str(root),
        "--profile",
        "reference-cpu-fp8-tp1",
        "--profile",
        "reference-cpu-bf16-tp1",
        "--no-accuracy-gate",
        "--calib-samples",
        "4",
        "--max-seq-len",
        "512",
    ]
    log = open(tmp_path / "store.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while (tmp_path / "store.log").read_text().count("added: ") < 1:  # the first profile is in: kill the second
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "store.log").read_text()
        time.sleep(0.2)
    while not list((root / "profiles").glob(".tmp-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = S.load_store(root)  # valid: the first profile, complete; the second not listed
    assert [(e.profile.name, e.status) for e in store.entries] == [("reference-cpu-fp8-tp1", S.BUILT)]
    assert store.model["source"] == f"{HUB_ID}@{COMMIT}"
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "reference-cpu-fp8-tp1 is already in the store" in resumed.stderr
    assert [e.status for e in S.load_store(root).entries] == [S.BUILT, S.BUILT]
    assert not list((root / "profiles").glob(".tmp-*"))  # the killed build's directory was removed

    served = ServedRepo(root, None, tmp_path / "serve.log", env=env)
    try:
        served.wait_ready()
        from openai import OpenAI

        client = OpenAI(base_url=served.openai_url, api_key="none")
        (model,) = [m.id for m in client.models.list().data]
        answer = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4)
        assert model == "smollm2" and answer.choices[0].text
    finally:
        assert served.stop() == 0
    out = served.output()
    assert "[nim_build store] node: cpu; profile: reference-cpu-fp8-tp1" in out
    assert "not reference-cpu-bf16-tp1: fp8 is preferred to bf16 (lower precision first)" in out

    # the override, by env and flag, and its error: `nim_build repo` is enough (the same selection as serve)
    chosen = run(
        "repo", str(root), "--out", str(tmp_path / "repo"), environ={**env, P.PROFILE_ENV: "reference-cpu-bf16-tp1"}
    )
    assert chosen.returncode == 0 and "profile: reference-cpu-bf16-tp1" in chosen.stderr, chosen.stderr
    bf16 = next(e.profile for e in S.load_store(root).entries if e.profile.quant == "bf16")
    assert f'"{root / "profiles" / bf16.id}"' in (tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    refused = run("repo", str(root), "--out", str(tmp_path / "r2"), "--profile", "trtllm-h100-sxm-fp8-tp1-throughput")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "Error: no profile 'trtllm-h100-sxm-fp8-tp1-throughput' here; the profiles are: reference-cpu-fp8-tp1, "
        "reference-cpu-bf16-tp1 (`nim_build profiles` lists them)"
    )

    (cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT / "tokenizer.json").unlink()
    for args in (("download", HUB_ID, "--cache", str(cache)), ("store", HUB_ID, "--out", str(tmp_path / "s2"))):
        failed = run(*args)
        assert failed.returncode == 2, failed.stderr
        line = failed.stderr.strip().splitlines()
        assert len(line) == 1 and "tokenizer.json missing from" in line[0] and "nim_build download" in line[0], line


# -- the chart: values for a store, rendered and validated by the real helm and Kubernetes schemas -----------------


def test_chart_values_for_a_store_follow_the_profile_chosen_for_the_target_node(tmp_path, capsys):
    from helm_tools import one, render, validate
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", num_heads=8, num_kv_heads=8)  # tp 1 to 8
    opts = BuildOptions(model=str(model), accuracy_gate=False)
    root = tmp_path / "nemo"
    from test_chart_cmd import make_engine_dir

    def build(model, out, opts, hf_cache, name):  # an engine directory with a full manifest, as a build writes
        make_engine_dir(out, tp=opts.tp, backend=opts.backend, gpu=None)
        (out / "tokenizer").mkdir()

    S.build_store(opts.model, root, opts, P.parse_node("H100-SXM x8"), all_runnable=True, build=build)
    for goal, tp in (("throughput", 1), ("latency", 8)):
        out = tmp_path / f"{goal}.yaml"
        code, _, err = run_cli(
            "chart", str(root), "--gpus", "H100-SXM x8", "--profile-goal", goal, "--out", str(out), capsys=capsys
        )
        assert code == 0, err
        values = yaml.safe_load(out.read_text())
        assert values["model"] == {
            "id": "/opt/nim/cache/models/" + Path(opts.model).name,  # a local checkpoint: copied onto the volume
            "revision": "main",
            "store": "stores/nemo",
            "profile": "auto",
            "profileGoal": goal,
        }
        assert values["engine"]["tensorParallelSize"] == tp and values["engine"]["backend"] == "trtllm"
        assert values["gpu"] == {"enabled": True, "products": ["NVIDIA-H100-80GB-HBM3"]}
        assert "is built on the node at the first start" in err
        values["persistence"] = {"existingClaim": "models"}
        objects = render(values)
        assert validate(objects) >= 3
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == tp
        env = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
        assert env["NIM_STORE"] == "stores/nemo" and env["NIM_PROFILE_GOAL"] == goal and "NIM_BUILD_PROFILE" not in env
    # on a CPU node the store's reference profile is chosen, and the values run on CPU
    code, _, _ = run_cli("chart", str(root), "--gpus", "cpu", "--out", str(tmp_path / "cpu.yaml"), capsys=capsys)
    values = yaml.safe_load((tmp_path / "cpu.yaml").read_text())
    assert code == 0 and values["gpu"]["enabled"] is False and values["engine"]["backend"] == "reference"
    from nim_build.deploy.chart import chart_values

    reference = next(e.profile for e in S.load_store(root).entries if e.profile.name == "reference-cpu-fp8-tp1")
    assert values["resources"] == chart_values(root / "profiles" / reference.id)[0]["resources"]  # its manifest's


def test_the_init_script_serves_the_store_profile(tmp_path):
    """The init container's script in store mode, with its rendered env and a stand-in nim_build that logs calls."""
    from helm_tools import one, render

    values = {
        "model": {"store": "stores/nemo", "profile": "reference-cpu-fp8-tp1"},
        "persistence": {"existingClaim": "m"},
    }
    init = one(render(values), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    assert env["NIM_BUILD_PROFILE"] == "reference-cpu-fp8-tp1" and env["HF_HUB_CACHE"] == "/opt/nim/cache/hf"
    env.update(NIM_CACHE_DIR=str(tmp_path / "cache"), NIM_REPO_DIR=str(tmp_path / "repo"))
    log, shim = tmp_path / "calls.log", tmp_path / "bin" / "nim_build"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s|" "$@" "$NIM_BUILD_PROFILE" >> {log}\necho >> {log}\n')
    shim.chmod(0o755)

    def run():
        return subprocess.run(
            ["/bin/sh", "-ec", *init["args"]],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "PATH": f"{shim.parent}:/usr/bin:/bin"},
        )

    missing = run()
    assert missing.returncode == 2 and "no model store at" in missing.stderr and not log.exists()
    (tmp_path / "cache" / "stores" / "nemo").mkdir(parents=True)
    (tmp_path / "cache" / "stores" / "nemo" / S.STORE_MANIFEST).write_text("format: nim_build.store\n")
    assert run().returncode == 0
    store = str(tmp_path / "cache" / "stores" / "nemo")
    assert log.read_text().splitlines() == [
        f"repo|{store}|--out|{tmp_path / 'repo'}|--profile-goal|throughput|reference-cpu-fp8-tp1|"
    ]
