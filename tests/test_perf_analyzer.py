"""perf_analyzer 2.51 (the one that matches the bundled Triton; scripts/perf-tools.sh makes it run here) profiles
the ensemble with streaming at concurrency 1 and 4 against `nim_build serve`, as README's command does; so does
genai-perf, which drives it."""

from __future__ import annotations

import csv
import json
import subprocess

from conftest import REPO


def test_perf_analyzer_streams_the_ensemble(triton_serve, tmp_path):
    tool = (
        subprocess.run(
            [str(REPO / "scripts" / "perf-tools.sh")], capture_output=True, text=True, timeout=600, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    data = tmp_path / "input.json"
    data.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "text_input": {"content": ["The capital of France is"], "shape": [1]},
                        "max_tokens": {"content": [8], "shape": [1]},
                        "stream": {"content": [True], "shape": [1]},
                    }
                ]
            }
        )
    )
    report = tmp_path / "report.csv"
    args = ["-m", "ensemble", "-i", "grpc", "--streaming", "-u", triton_serve.grpc_url, "--input-data", str(data)]
    args += ["--concurrency-range", "1:4:3", "--measurement-mode", "count_windows", "--measurement-request-count"]
    # Up to 10 windows, not 3, for a concurrency to stabilize: under a loaded suite the report once lacked
    # concurrency 4 although perf_analyzer exited 0 (an unstable measurement is the likely cause, not confirmed).
    args += ["4", "--stability-percentage", "100", "--max-trials", "10", "-f", str(report)]
    proc = subprocess.run([str(REPO / tool), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {int(r["Concurrency"]): r for r in csv.DictReader(report.open())}
    assert sorted(rows) == [1, 4], proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in rows.values():
        assert float(r["Inferences/Second"]) > 0, r
        assert float(r.get("Avg latency") or r["p50 latency"]) > 0, r


def test_genai_perf_reports_ttft_and_itl_of_the_streaming_ensemble(default_model_dir, tmp_path):
    """genai-perf 0.0.16 (scripts/genai-perf.sh) on the ensemble, streaming, at concurrency 1 and 4, as README's
    command: synthetic 32-token prompts tokenized with the served model's own tokenizer, 16 output tokens.

    The repository is the real one around the trivial engine (20 ms per step, no CPU): with the real engine on this
    2-core machine, one busy process beside it was enough for perf_analyzer to see no request end within a 4 s or
    even an 8 s window ("No valid requests recorded within time interval"), which made the test flaky in CI.
    BENCHMARKS.md section 9 has the real engine's figures."""
    from conftest import ServedRepo, hf_tokenizer_dir, tokenizer_engine_dir

    from nim_build.serving.repo import RepoOptions, generate_repo
    from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

    tool = (
        REPO
        / subprocess.run(
            [str(REPO / "scripts" / "genai-perf.sh")], capture_output=True, text=True, timeout=900, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    tokenizer = hf_tokenizer_dir(default_model_dir, tmp_path / "tokenizer")
    engine = tokenizer_engine_dir(tmp_path, tokenizer, step_delay_s=0.02)
    repo = generate_repo(engine, tmp_path / "repo", RepoOptions(engine_class=TRIVIAL_ENGINE))
    served = ServedRepo(repo, engine, tmp_path / "serve.log")
    try:
        served.wait_ready(120)
        for concurrency in (1, 4):
            out = tmp_path / f"c{concurrency}"
            args = ["profile", "-m", "ensemble", "--endpoint-type", "kserve", "--backend", "tensorrtllm"]
            args += ["--streaming", "-u", served.grpc_url, "--concurrency", str(concurrency)]
            args += ["--tokenizer", str(tokenizer), "--synthetic-input-tokens-mean", "32"]
            args += ["--output-tokens-mean", "16", "--num-prompts", "16"]
            # time windows: with --request-count, genai-perf's perf_analyzer 2.51 never ended at concurrency 4
            args += ["--measurement-interval", "4000", "--artifact-dir", str(out), "-v"]  # -v: perf_analyzer's output
            for _ in range(2):
                proc = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=180, cwd=tmp_path)
                # Once in a full suite run, perf_analyzer 2.51 exited 0 after its report but left its profile export
                # empty (genai-perf: "Failed to parse JSON string: ''"); not reproduced alone or beside a busy
                # process. That one case is run again, once.
                if "Failed to parse JSON string: ''" not in proc.stdout + proc.stderr:
                    break
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            (export,) = out.glob("*/profile_export_genai_perf.json")
            report = json.loads(export.read_text())
            assert report["request_count"]["avg"] >= concurrency, report["request_count"]
            for metric in ("time_to_first_token", "inter_token_latency"):
                m = report[metric]
                assert m["unit"] == "ms" and 0 < m["p50"] <= m["max"], m
            # the engine's 20 ms step sets the time between tokens
            assert 15 < report["inter_token_latency"]["p50"] < 200, report["inter_token_latency"]
    finally:
        served.stop()
