"""tensorrtllm_backend's own client scripts (c2e65b8, tests/upstream, unmodified) against `nim_build serve`.

Each script runs as a user runs it, with its own argparse defaults, and checks what it checks itself
(--check-outputs / --check-output, its exit code); the expected texts and token ids come from the reference
runtime run in process, greedy (the scripts send temperature 1.0 with no top-k / top-p, which TensorRT-LLM decodes
greedily: docs/TRITON.md). Both transaction policies are served: decoupled (streaming) and not (in-flight batched).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serving

from nim_build.runtime import LLMEngine, SamplingParams
from nim_build.serving.repo import RepoOptions, generate_repo
from nim_build.serving.tokenizer import Tokenizer
from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

UPSTREAM = Path(__file__).parent / "upstream"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
LEN = 8


@pytest.fixture(scope="module")
def greedy(reference_engine_dir):
    """(prompt ids) -> greedy generated ids, and the tokenizer, from the reference runtime itself."""
    engine = LLMEngine.from_engine_dir(reference_engine_dir, max_batch_size=4)
    tok = Tokenizer.from_engine_dir(reference_engine_dir)
    done: dict[tuple, list[int]] = {}

    def generate(ids, n=LEN):
        key = (tuple(ids), n)
        if key not in done:
            done[key] = engine.generate(ids, SamplingParams(n))
        return done[key]

    yield generate, tok
    engine.shutdown()


@pytest.fixture(scope="module")
def non_decoupled(reference_engine_dir, tmp_path_factory):
    """A second server: the non-decoupled repository, with the TensorRT-LLM backend's own default for
    exclude_input_in_output (false), which inflight_batcher_llm_client.py's checks assume."""
    root = tmp_path_factory.mktemp("nondecoupled")
    repo = generate_repo(
        reference_engine_dir, root / "repo", RepoOptions(decoupled=False, exclude_input_in_output=False)
    )
    with serving(repo, reference_engine_dir, root / "serve.log") as served:
        yield served


@pytest.fixture(scope="module")
def trivial_served(triton_serve, tmp_path_factory):
    from conftest import tokenizer_engine_dir

    from nim_build.serving.tokenizer import REPO_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("trivial")
    engine = tokenizer_engine_dir(root, triton_serve.repo / REPO_TOKENIZER_DIR)
    repo = generate_repo(
        engine,
        root / "repo",
        RepoOptions(
            decoupled=False,
            exclude_input_in_output=False,  # what the tool's statistics assume (the backend's default)
            engine_class=TRIVIAL_ENGINE,
        ),
    )
    with serving(repo, engine, root / "serve.log") as served:
        yield served, str(engine / "tokenizer")


def run(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run(
        [sys.executable, str(UPSTREAM / script), *args], capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Received an error from server" not in out and "Traceback" not in out, out[-4000:]
    return out


def expected_texts(greedy, prompts, n=LEN):
    gen, tok = greedy
    return [tok.decode(gen(tok.encode(p), n)) for p in prompts]


# -- inflight_batcher_llm/client/end_to_end_grpc_client.py: ensemble / BLS, text in, text out ------------------
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("streaming", [False, True], ids=["one-shot", "streaming"])
def test_end_to_end_grpc_client(triton_serve, greedy, model, streaming):
    """Its defaults: text_input / max_tokens / stream / beam_width 1 / temperature 1.0 / exclude_input_in_output
    False as [1, 1] tensors, text_output read as output[0].decode(); one-shot text includes the prompt."""
    expected = expected_texts(greedy, PROMPTS[:1])
    args = ["-u", triton_serve.grpc_url, "--model-name", model, "-p", PROMPTS[0], "-o", str(LEN)]
    args += ["--check-outputs", "--expected-outputs", json.dumps(expected)] + ["-S"] * streaming
    run("end_to_end_grpc_client.py", *args)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_grpc_client_batch_inputs_and_n(triton_serve, greedy, model):
    """--batch-inputs sends both prompts as one [2, 1] request (answered per row with batch_index); -n 2 returns
    two sequences (sequence_index), both greedy here; with log probs and perf metrics asked for."""
    expected = expected_texts(greedy, PROMPTS)
    common = ["-u", triton_serve.grpc_url, "--model-name", model, "-p", json.dumps(PROMPTS), "-o", str(LEN)]
    common += ["--check-outputs", "--expected-outputs", json.dumps(expected)]
    run("end_to_end_grpc_client.py", *common, "--batch-inputs", "-S")
    out = run("end_to_end_grpc_client.py", *common, "-n", "2", "--return-log-probs", "--return-perf-metrics")
    assert "first_token_time_ns:" in out and "kv_cache_alloc_new_blocks:" in out


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_grpc_client_not_decoupled(non_decoupled, greedy, model):
    expected = expected_texts(greedy, PROMPTS[:1])
    args = ["-u", non_decoupled.grpc_url, "--model-name", model, "-p", PROMPTS[0], "-o", str(LEN)]
    run("end_to_end_grpc_client.py", *args, "--check-outputs", "--expected-outputs", json.dumps(expected))


# -- inflight_batcher_llm/client/inflight_batcher_llm_client.py: tensorrt_llm, token ids in and out -------------
def _ids_csv(tmp_path, ids) -> str:
    path = tmp_path / "expected.csv"
    path.write_text(",".join(str(i) for i in ids) + "\n")
    return str(path)


def test_inflight_batcher_llm_client_streaming(triton_serve, greedy, reference_engine_dir, tmp_path):
    """Streaming (decoupled): runtime_top_k 1, runtime_top_p 0.0, temperature 1.0, request_output_len 16 by
    default; each response carries only the new ids and a sequence_length, the client checks exact ids."""
    gen, tok = greedy
    ids = tok.encode(
        "Born in north-east France, Soyer trained as a"
    )  # its --text default, through the same tokenizer files it loads with AutoTokenizer
    tok_dir = str(reference_engine_dir / "tokenizer")
    expected = gen(ids, 16)  # --exclude-input-in-output: the repository's default, so no prompt in the check
    args = ["-u", triton_serve.grpc_url, "--tokenizer-dir", tok_dir, "--streaming", "--exclude-input-in-output"]
    out = run(
        "inflight_batcher_llm_client.py", *args, "--check-output", "--output-tokens-csv", _ids_csv(tmp_path, expected)
    )
    assert "PASS!" in out


def test_inflight_batcher_llm_client_not_decoupled(non_decoupled, greedy, reference_engine_dir, tmp_path):
    """async_infer on the non-decoupled model, all outputs returned: output_ids hold the prompt and the new ids
    (exclude_input_in_output false), sequence_length their count; with log probs asked for."""
    gen, tok = greedy
    ids = tok.encode("Born in north-east France, Soyer trained as a")
    tok_dir = str(reference_engine_dir / "tokenizer")
    csv = _ids_csv(tmp_path, ids + gen(ids, 16))
    args = ["-u", non_decoupled.grpc_url, "--tokenizer-dir", tok_dir, "--check-output", "--output-tokens-csv", csv]
    assert "PASS!" in run("inflight_batcher_llm_client.py", *args, "--return-log-probs")


def test_inflight_batcher_llm_client_stop_after_ms(triton_serve, reference_engine_dir):
    """--stop-after-ms sends `stop` with the same request id on the same stream; the client asserts it got fewer
    tokens than it asked for, and the stop request's empty response."""
    tok_dir = str(reference_engine_dir / "tokenizer")
    args = ["-u", triton_serve.grpc_url, "--tokenizer-dir", tok_dir, "--streaming", "--request-output-len", "300"]
    out = run("inflight_batcher_llm_client.py", *args, "--stop-after-ms", "300", "--request-id", "1")
    assert "Got cancellation response from server" in out


# -- tools/inflight_batcher_llm: end_to_end_test.py and benchmark_core_model.py -------------------------------
def short_dataset(tmp_path, records: int = 2, words: int = 24) -> str:
    """upstream CI's dataset (simple_data.json), its articles cut to `words` words and its reference summaries
    to a few, so the tools' runs fit in the suite's time on two CPU cores."""
    data = json.loads((UPSTREAM / "simple_data.json").read_text())[:records]
    for r in data:
        r["input"] = " ".join(r["input"].split()[:words])
        r["output"] = " ".join(r["output"].split()[:4])
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_end_to_end_test_tool(non_decoupled, tmp_path):
    """Upstream CI's call (HTTP, non-decoupled): for each dataset prompt, preprocessing -> tensorrt_llm ->
    postprocessing by hand must equal the ensemble's text exactly, then every prompt at once (and 10 warm-ups)."""
    tool = "tools/inflight_batcher_llm/end_to_end_test.py"
    out = run(tool, "-u", non_decoupled.http_url, "--max-input-len", "500", "--dataset", short_dataset(tmp_path))
    assert "Start testing on 2 prompts" in out and "Expected" not in out


def test_benchmark_core_model_tool(trivial_served, tmp_path):
    """benchmark_core_model.py sends tensorrt_llm input_ids / input_lengths / request_output_len / pad_id /
    end_id only, 10 warm-ups of 100 tokens first: served by the trivial engine (the same tensorrt_llm model
    around a model-free engine), since only the protocol is under test here."""
    served, tok_dir = trivial_served
    tool = "tools/inflight_batcher_llm/benchmark_core_model.py"
    args = ["-i", "grpc", "-u", served.grpc_url, "--max-input-len", "500", "--num-requests", "6"]
    out = run(tool, *args, "dataset", "--dataset", short_dataset(tmp_path, records=6), "--tokenizer-dir", tok_dir)
    # its statistics read output_ids' length from dimension 2 of the first output of each response
    stats = dict(re.findall(r"\|\s*([A-Za-z][^|]*?)\s*\|\s*([0-9.]+)\s*\|", out))
    assert stats.get("Total requests") == "6.00" and float(stats.get("Avg. OP tokens per request", 0)) > 0, out


def test_not_decoupled_requests_still_batch_in_flight(non_decoupled, greedy):
    """Issue 12, item 5: without the decoupled policy tensorrt_llm still answers through its response sender,
    so concurrent one-shot requests share the engine's steps (as under the TensorRT-LLM backend)."""
    from concurrent.futures import ThreadPoolExecutor

    from nim_build.serving.client import Client, GenerateRequest

    before = non_decoupled.engine_stats()["max_seqs_in_step"]
    c = Client(non_decoupled.grpc_url, "grpc", "ensemble")
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda p: c.generate(GenerateRequest(prompt=p, max_tokens=LEN)).text, PROMPTS))
    gen, tok = greedy
    assert texts == [tok.decode(gen(tok.encode(p))) for p in PROMPTS]
    assert non_decoupled.engine_stats()["max_seqs_in_step"] >= max(before, 2)


def test_the_openai_api_on_the_non_decoupled_repository(non_decoupled, triton_serve):
    """tensorrt_llm answers once per request there: the API asks without streaming and still streams to its
    clients (in one piece), with the decoupled repository's greedy text."""
    import openai

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    answers = []
    for served in (triton_serve, non_decoupled):
        client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        whole = client.chat.completions.create(model=model, messages=chat, max_tokens=16, temperature=0, n=2)
        stream = client.chat.completions.create(model=model, messages=chat, max_tokens=16, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        answers.append(([c.message.content for c in whole.choices], streamed))
    assert answers[0] == answers[1]
    assert answers[1][0][0] == answers[1][1]
