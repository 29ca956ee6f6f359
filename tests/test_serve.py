"""Server lifecycle with tiny python models: start/stop, readiness, clear one-line errors (no LLM needed).

Each test here starts at most one short-lived server; the session's LLM server (tests/test_triton_*.py) starts
after this file has run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServedRepo, free_ports

from nim_build.errors import ServerSetupError, ServingError
from nim_build.serving.server import TritonServer
from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

IDENTITY_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
input [{{ name: "IN" data_type: TYPE_STRING dims: [1] }}]
output [{{ name: "OUT" data_type: TYPE_STRING dims: [1] }}]
instance_group [{{ count: 1 kind: KIND_CPU }}]
"""
IDENTITY_MODEL = """import time
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def initialize(self, args):
        {init}
    def finalize(self):
        {finalize}
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                .as_numpy())]) for r in requests]
"""


def _repo(root: Path, init: str = "pass", finalize: str = "pass") -> Path:
    model = root / "repo" / "ident"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(IDENTITY_CONFIG.format(name="ident"))
    (model / "1" / "model.py").write_text(IDENTITY_MODEL.format(init=init, finalize=finalize))
    return root / "repo"


def _server(repo: Path, **kw) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(
        repo, host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics, exit_timeout_s=3, **kw
    )


def test_start_infer_stop(tmp_path):
    import numpy as np
    import tritonclient.http as httpclient

    server = _server(_repo(tmp_path))
    with server:
        assert server.ready()
        client = httpclient.InferenceServerClient(server.http_url)
        inp = httpclient.InferInput("IN", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([["héllo".encode()]], dtype=object))
        assert client.infer("ident", [inp]).as_numpy("OUT")[0, 0].decode() == "héllo"
        client.close()
    assert server.proc.returncode == 0
    assert not server.running() and not server.ready()


def test_repository_that_does_not_load_shows_tritons_reason(tmp_path):
    server = _server(_repo(tmp_path, init="raise ValueError('tokenizer directory missing')"))
    server.start()
    try:
        with pytest.raises(ServingError, match="tokenizer directory missing") as e:
            server.wait_ready(60)
        assert "\n" not in str(e.value)
    finally:
        server.stop()


def test_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        http, metrics = free_ports(2)
        server = TritonServer(_repo(tmp_path), host="127.0.0.1", http_port=http, grpc_port=port, metrics_port=metrics)
        with pytest.raises(ServerSetupError, match=f"port {port} is already in use.*--grpc-port"):
            server.start()
    assert server.proc is None


def test_not_a_repository(tmp_path):
    with pytest.raises(ServerSetupError, match="not a Triton model repository"):
        TritonServer(tmp_path)


def _serve_cli(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nim_build", "serve", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_missing_binary(tmp_path):
    import os

    env = dict(os.environ, TRITONSERVER=str(tmp_path / "no-tritonserver"))
    out = _serve_cli([str(_repo(tmp_path))], env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("Error: TRITONSERVER=") and len(out.stderr.strip().splitlines()) == 1


def test_cli_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _serve_cli([str(_repo(tmp_path)), "--http-port", str(port)])
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"Error: port {port} is already in use on 0.0.0.0; stop what listens there or pick another with --http-port"
    )


def test_world_size_runs_one_process_per_rank_under_mpirun(tmp_path, monkeypatch):
    """TP engines: mpirun, rank 0 serves every model, other ranks only tensorrt_llm, own shm prefix each."""
    import json

    from nim_build.serving.server import engine_world_size

    repo = _repo(tmp_path)
    llm = repo / "tensorrt_llm"
    (llm / "1").mkdir(parents=True)
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"world_size": 2}}}))
    (llm / "config.pbtxt").write_text(
        f'name: "tensorrt_llm"\nbackend: "tensorrtllm"\nparameters {{ key: '
        f'"gpt_model_path" value {{ string_value: "{engine}" }} }}\n'
    )
    assert engine_world_size(repo) == 2
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/mpirun")
    server = TritonServer(repo, http_port=1, grpc_port=2, metrics_port=3)
    cmd = server.command(Path("/opt/tritonserver/bin/tritonserver"), Path("/opt/tritonserver/backends"))
    assert cmd[:2] == ["/usr/bin/mpirun", "--allow-run-as-root"]
    ranks = " ".join(cmd[2:]).split(" : ")
    assert len(ranks) == 2
    assert "--load-model=tensorrt_llm" not in ranks[0] and "--http-port=1" in ranks[0]
    assert "--model-control-mode=explicit --load-model=tensorrt_llm" in ranks[1]
    prefixes = [r.split("shm-region-prefix-name=")[1].split()[0] for r in ranks]
    assert prefixes[0] != prefixes[1]


def test_cli_serves_until_sigterm_then_exits_cleanly(tmp_path):
    import time

    args = ("--exit-timeout", "3", "--quiet", "--health-interval", "1")
    served = ServedRepo(_repo(tmp_path), None, tmp_path / "serve.log", args=args)
    try:
        served.wait_ready(60)
        assert f"ready: HTTP {served.http_url}  gRPC {served.grpc_url}" in served.output()
        time.sleep(1.5)  # at least one health check
    finally:
        assert served.stop() == 0
    assert "stopped (Triton exit code 0)" in served.output()


def test_stops_in_time_after_many_client_streams(default_model_dir, tmp_path):
    """After its final response, nim_build's client closes the gRPC stream without cancelling it: cancelling a
    finished stream leaves Triton 2.51 holding the model, which then cannot unload, so shutdown waited out
    --exit-timeout and Triton exited with code 1 (measured before the fix: 6 of 10 shutdowns after 800
    requests). A race: without the fix this test fails in about half of its runs (3 of 6 measured)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import hf_tokenizer_dir, serving, tokenizer_engine_dir

    from nim_build.serving.client import Client, GenerateRequest
    from nim_build.serving.repo import RepoOptions, generate_repo

    repo = generate_repo(
        tokenizer_engine_dir(tmp_path, hf_tokenizer_dir(default_model_dir, tmp_path / "tokenizer")),
        tmp_path / "repo",
        RepoOptions(engine_class=TRIVIAL_ENGINE),
    )
    with serving(repo, tmp_path, tmp_path / "serve.log") as served:
        for model in ("ensemble", "tensorrt_llm_bls"):

            def one(i, model=model):
                req = GenerateRequest(prompt="ping", max_tokens=1, stream=i % 2 == 0)
                return Client(served.grpc_url, "grpc", model, timeout_s=30).generate(req).text

            with ThreadPoolExecutor(4) as pool:
                assert all(isinstance(t, str) for t in pool.map(one, range(1500)))
    assert served.proc.returncode == 0
    assert "Exit timeout expired" not in served.output() and "stopped (Triton exit code 0)" in served.output(), (
        served.output()[-3000:]
    )


# --- every way `nim_build serve` ends stops everything it started --------------------------------------------


@pytest.mark.parametrize("ending", ["sigterm", "stub-hangs-at-exit", "triton-crashes", "triton-hangs"])
def test_serve_leaves_no_process_and_no_shared_memory(tmp_path, ending):
    """Whatever way serve exits, no process it started survives and /dev/shm holds none of its python stubs'
    regions; serve's exit code is 0 only for a clean stop, 4 (serving failed: not 2) otherwise.
    sigterm: a clean stop. stub-hangs-at-exit: a model's finalize never returns, Triton gives up after
    --exit-timeout and exits non-zero, leaving the stub behind. triton-crashes: Triton is killed under serve.
    triton-hangs: Triton stops responding (SIGSTOP), so serve kills it after --exit-timeout + 10 s."""
    import signal

    import psutil

    ignore_signals = (
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)"
    )
    repo = _repo(
        tmp_path,
        finalize=f"{ignore_signals}; time.sleep(120)" if ending == "stub-hangs-at-exit" else "pass",
    )
    args = ("--exit-timeout", "5" if ending == "sigterm" else "1", "--health-interval", "0.5")
    served = ServedRepo(repo, None, tmp_path / "serve.log", args=args)
    proc = served.proc
    try:
        served.wait_ready(60)
        started = psutil.Process(proc.pid).children(recursive=True)
        triton = next(p for p in started if p.name() == "tritonserver")
        assert any("triton_python_backend_stub" in p.name() for p in started)
        shm = f"nimb{proc.pid}s"
        assert list(Path("/dev/shm").glob(shm + "*")), "the python stub made no shared-memory region"
        if ending == "triton-crashes":
            triton.kill()
        elif ending == "triton-hangs":
            triton.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        served.stop()
    out = served.output()
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"
    assert not list(Path("/dev/shm").glob(shm + "*"))
    last = out.strip().splitlines()[-1]
    if ending == "sigterm":
        assert code == 0 and last == "stopped (Triton exit code 0)", out[-2000:]
        return
    assert code == 4, out[-2000:]
    assert "Traceback" not in out
    expected = {
        "stub-hangs-at-exit": "Error: Triton exited with code 1 when asked to stop",
        "triton-crashes": "Error: Triton stopped serving: Triton exited with code -9",
        "triton-hangs": "Error: Triton did not stop within --exit-timeout 1 s and was killed",
    }[ending]
    assert last.startswith(expected), last
    if ending == "stub-hangs-at-exit":
        assert "Exit timeout expired" in last  # the reason, picked from Triton's log


def test_sigterm_while_models_load_stops_serve_at_once(tmp_path):
    """A pod stopped while its engine is still loading (the startup budget can be long) stops then, not after the
    startup timeout: serve listens to SIGTERM from the start, and leaves no process behind."""
    import signal
    import time

    import psutil

    repo = _repo(tmp_path, init="time.sleep(60)")  # a model that takes a minute to load
    served = ServedRepo(repo, None, tmp_path / "serve.log", args=("--exit-timeout", "2", "--startup-timeout", "600"))
    try:
        deadline = time.monotonic() + 60
        while not any("triton_python_backend_stub" in p.name() for p in psutil.Process(served.proc.pid).children(True)):
            assert served.proc.poll() is None and time.monotonic() < deadline, served.output()[-2000:]
            time.sleep(0.2)
        started = psutil.Process(served.proc.pid).children(recursive=True)
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        served.stop()
    assert "ready:" not in served.output() and "Traceback" not in served.output()
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("postprocessing", ["native", "python"])
def test_sigterm_under_load_lets_the_streams_finish_then_stops_everything(default_model_dir, tmp_path, postprocessing):
    """Issue 12: SIGTERM while ensemble streams run. Triton 2.51 stops its endpoints at SIGTERM, so streams in flight
    then hung until Triton overstayed its exit timeout and was killed (12 streams: 40 s). serve now waits for the
    models to unload first: every stream completes, Triton exits 0, and nothing is left. Before the load, 4 gRPC
    clients leave their streams (cancelling them) after the first response: those ensemble requests used to stay in
    flight forever (a cancelled postprocessing step answered an error), so Triton waited out its exit timeout."""
    import signal
    import threading
    import time

    import psutil
    from conftest import hf_tokenizer_dir, tokenizer_engine_dir

    from nim_build.errors import InferenceError
    from nim_build.serving.client import Client, GenerateRequest
    from nim_build.serving.repo import RepoOptions, generate_repo

    tok = hf_tokenizer_dir(default_model_dir, tmp_path / "tokenizer")
    engine = tokenizer_engine_dir(tmp_path, tok, step_delay_s=0.02)  # 120 tokens: >= 2.4 s
    repo = generate_repo(
        engine,
        tmp_path / "repo",
        RepoOptions(engine_class=TRIVIAL_ENGINE, postprocessing=postprocessing),
    )
    served = ServedRepo(repo, engine, tmp_path / "serve.log", args=("--exit-timeout", "20", "--health-interval", "2"))
    results: list = []

    def stream() -> None:
        try:
            req = GenerateRequest(prompt="Every stream says hello", max_tokens=120, stream=True)
            results.append(("done", Client(served.grpc_url, timeout_s=60).generate(req).text))
        except Exception as e:
            results.append((type(e).__name__, str(e)[:200]))

    def leave() -> None:
        import tritonclient.grpc as grpcclient

        from nim_build.serving.client import grpc_inputs

        first = threading.Event()
        client = grpcclient.InferenceServerClient(served.grpc_url)
        client.start_stream(callback=lambda result, error: first.set())
        body = {"text_input": "A client that leaves", "max_tokens": 120, "stream": True}
        client.async_stream_infer("ensemble", grpc_inputs(body))
        assert first.wait(30)
        client.stop_stream(cancel_requests=True)
        client.close()

    try:
        served.wait_ready(120)
        stream()  # alone: the whole text (a stream behind the engine gets several tokens per response)
        whole = results.pop()
        for _ in range(4):
            leave()
        served.wait_idle()
        started = psutil.Process(served.proc.pid).children(recursive=True)
        clients = [threading.Thread(target=stream) for _ in range(8)]
        for c in clients:
            c.start()
        served.wait_stats(lambda s: s.get("active", 0) >= 8)
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # draining: the ensemble is unloading, so a new request is refused by Triton at once
        late = GenerateRequest(prompt="A late request", max_tokens=4)
        with pytest.raises(InferenceError, match="'ensemble' has no available versions"):
            Client(served.grpc_url, timeout_s=30).generate(late)
        for c in clients:
            c.join(60)
        code = served.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        served.stop()
    assert whole[0] == "done" and results == [whole] * 8, results
    assert code == 0 and took < 20, (code, took, served.output()[-2000:])
    assert served.output().strip().endswith("stopped (Triton exit code 0)")
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not list(Path("/dev/shm").glob(f"nimb{served.proc.pid}s*"))


def test_max_queue_size_refuses_what_exceeds_it_and_serving_goes_on(default_model_dir, tmp_path):
    """--max-queue-size: upstream's max_queue_size (for the reference backend the python model's parameter:
    tests/test_triton_repo.py says why). On the non-decoupled repository a client that leaves does not cancel its
    request (Triton 2.51 does not cancel a running ensemble step), so this bound is what keeps a flood from piling up
    work. With max_batch_size 1 and a bound of 1, one request runs and one waits; the next is refused at once, as
    UNAVAILABLE (tritonclient over HTTP), and a 503 in OpenAI's error shape from the real `openai` client. The two
    others complete."""
    import json
    import threading
    import urllib.error
    import urllib.request

    import numpy as np
    import openai
    import tritonclient.http as httpclient
    from conftest import ServedRepo, hf_tokenizer_dir, tokenizer_engine_dir
    from tritonclient.utils import InferenceServerException

    from nim_build.errors import QUEUE_FULL
    from nim_build.serving.client import Client, GenerateRequest
    from nim_build.serving.repo import RepoOptions, generate_repo, read_config

    engine = tokenizer_engine_dir(tmp_path, hf_tokenizer_dir(default_model_dir, tmp_path / "tok"), step_delay_s=0.05)
    opts = RepoOptions(engine_class=TRIVIAL_ENGINE, decoupled=False, max_batch_size=1, max_queue_size=1)
    repo = generate_repo(engine, tmp_path / "repo", opts)
    assert read_config(repo / "tensorrt_llm" / "config.pbtxt").parameters["max_queue_size"].string_value == "1"
    # no health generation during the test: it would take the one waiting place
    served = ServedRepo(repo, engine, tmp_path / "serve.log", args=("--health-interval", "120", "--exit-timeout", "20"))
    results: list = []

    def generate() -> None:
        req = GenerateRequest(prompt="hello there", max_tokens=60)  # 60 steps of 50 ms
        results.append(Client(served.grpc_url, timeout_s=60).generate(req).text)

    try:
        served.wait_ready()
        threads = [threading.Thread(target=generate) for _ in range(2)]
        threads[0].start()
        served.wait_stats(lambda s: s.get("active") == 1)
        threads[1].start()
        served.wait_stats(lambda s: s.get("waiting") == 1)
        # Triton's HTTP API: 503 from tensorrt_llm itself; the ensemble reports its step's error as a 400 (Triton
        # 2.51 drops the step's error code), with the same message
        inputs = []
        for name, value in (("input_ids", [[5, 6, 7]]), ("input_lengths", [[3]]), ("request_output_len", [[4]])):
            inputs.append(httpclient.InferInput(name, [1, len(value[0])], "INT32"))
            inputs[-1].set_data_from_numpy(np.array(value, np.int32))
        with pytest.raises(InferenceServerException) as direct:
            httpclient.InferenceServerClient(served.http_url).infer("tensorrt_llm", inputs)
        assert direct.value.status() == "503" and QUEUE_FULL in direct.value.message()
        body = json.dumps({"text_input": "hi", "max_tokens": 4}).encode()
        url = f"http://{served.http_url}/v2/models/ensemble/generate"
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
        assert http.value.code == 400 and QUEUE_FULL in http.value.read().decode()
        api = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
        model = api.models.list().data[0].id
        with pytest.raises(openai.APIStatusError) as refused:
            api.completions.create(model=model, prompt="hi", max_tokens=4)
        assert refused.value.status_code == 503, refused.value.body
        assert refused.value.body["type"] == "service_unavailable" and QUEUE_FULL in refused.value.body["message"]
        for t in threads:
            t.join(60)
        assert len(results) == 2 and all(results), results
    finally:
        assert served.stop() == 0, served.output()[-3000:]
