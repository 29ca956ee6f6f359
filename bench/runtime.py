"""The reference runtime (nim_build.runtime) beside CPU peers on the embedded model (SmolLM2-135M-Instruct).

Every row runs the same greedy workload, never stopping early, on the same threads (torch.get_num_threads()):
  decode       one stream, a --prompt-len prompt, --new-tokens tokens: (n - 1) / (last token - first token)
  prefill      time to the first token of a --prompt-len and of a --long-prompt prompt; for the long one, GFLOP/s
               (2 x the decoder layers' linear parameters x tokens / time; attention and lm_head left out) and its
               share of this machine's matmul rate in the dtype the row multiplies in
  concurrent   --concurrency requests of the decode workload at once, aggregate output tok/s: nim_build through
               LLMEngine's in-flight batching, transformers and onnxruntime-genai as one static batch
Measured in the same run: memory read GB/s (sum over 512 MiB of float32), fp32 / bf16 / int8 matmul GFLOP/s
(2048^3), and per row the decode step's memory-bandwidth limit: the bytes a step reads (the linear weights as the
row holds them, lm_head included) over that bandwidth. Medians of --repeats runs, after a warm-up. Each row runs in
a subprocess of this script (`--rows NAME --child`): no row's OpenMP teams or ORT thread pool slow the next
(nim_build/runtime/threads.py). onnxruntime-genai models are built once into .cache/bench/ortgenai-{fp32,int4}.

    pip install -e '.[bench]'
    python bench/runtime.py [--rows nim-bf16-fp32,hf-fp32,...] [--repeats 3] [--new-tokens 128] [--prompt-len 32]
                            [--long-prompt 512] [--concurrency 16] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batching import checkpoint  # noqa: E402  (bench/, this script's folder)

# name: (system, checkpoint or ONNX precision, compute dtype: float32, bfloat16, int8 or "serving")
ROWS = {
    "nim-bf16-fp32": ("nim_build", "bf16", "float32"),
    "nim-bf16-serving": ("nim_build", "bf16", "serving"),
    "nim-fp8-fp32": ("nim_build", "fp8", "float32"),  # the accuracy gate's exact mode
    "nim-fp8-serving": ("nim_build", "fp8", "serving"),
    "hf-fp32": ("transformers", None, "float32"),
    "hf-bf16": ("transformers", None, "bfloat16"),
    "ortgenai-fp32": ("onnxruntime-genai", "fp32", "float32"),
    "ortgenai-int4": ("onnxruntime-genai", "int4", "int8"),  # MatMulNBits, accuracy_level 4: int8 activations
}


def hf_dir() -> Path:
    from nim_build.builder.default_model import materialize_default_model

    return materialize_default_model(REPO / ".cache" / "test-models")


def best(fn, n: int) -> float:
    """The shortest of n timed calls, after one untimed."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine_limits() -> dict:
    x = torch.ones(128 * 2**20)  # 512 MiB of float32
    read = x.nbytes / best(x.sum, 5) / 1e9
    del x
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = (torch.randint(-127, 128, (2048, 2048), dtype=torch.int8) for _ in range(2))
    ops = {"float32": lambda: a @ b, "bfloat16": lambda: a16 @ b16, "int8": lambda: torch._int_mm(a8, b8)}
    return {
        "threads": torch.get_num_threads(),
        "read_gbs": read,
        "matmul_gflops": {k: 2 * 2048**3 / best(op, 3) / 1e9 for k, op in ops.items()},
    }


def linear_params(model_dir: Path) -> int:
    """Parameters in the decoder layers' linears (what a prefill token multiplies; lm_head runs on one token)."""
    c = json.loads((model_dir / "config.json").read_text())
    h, head = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    return c["num_hidden_layers"] * (h * (q + 2 * kv) + q * h + 3 * h * c["intermediate_size"])


# -- the systems: stream(prompt, n) -> (start, first token, last token) times; batch(prompts, n) -> seconds ------


class NimBuild:
    concurrent_mode = "in-flight"

    def __init__(self, quant: str, compute: str, concurrency: int):
        from nim_build.runtime.engine import LLMEngine
        from nim_build.runtime.model import DecoderModel

        dtype = serving_dtype() if compute == "serving" else getattr(torch, compute)
        self.compute = str(dtype).removeprefix("torch.")
        self.model = DecoderModel.from_checkpoint(checkpoint(quant, None), compute_dtype=dtype)
        # The weights as held (a `.packed` oneDNN copy of one counts once); gate is None where fc holds gate+up.
        linears = [getattr(layer, a) for layer in self.model.layers for a in ("qkv", "dense", "fc", "gate", "proj")]
        self.step_bytes = sum(lin.weight.nbytes for lin in [*linears, self.model.lm_head] if lin is not None)
        limits = {"max_seq_len": 1024, "max_batch_size": concurrency, "max_num_tokens": 8192}
        self.engine = LLMEngine(self.model, **limits, end_id=-1)
        self.engine.start()

    def _run(self, prompts: list[list[int]], n: int) -> list:
        from nim_build.runtime import SamplingParams

        finals, counts, done = [], {}, threading.Event()

        def on_event(ev):
            counts[ev.request_id] = counts.get(ev.request_id, 0) + len(ev.token_ids)
            if ev.finished:
                finals.append(ev)
                if len(finals) == len(prompts):
                    done.set()

        for p in prompts:
            self.engine.submit(p, SamplingParams(n, end_id=-1), on_event)
        done.wait()
        if any(ev.error for ev in finals) or set(counts.values()) != {n}:
            raise RuntimeError(f"nim_build: {[ev.error for ev in finals]}, tokens {sorted(counts.values())}")
        return finals

    def stream(self, prompt, n):
        (ev,) = self._run([prompt], n)
        return ev.arrival, ev.first_token, ev.last_token

    def batch(self, prompts, n):
        finals = self._run(prompts, n)
        return max(ev.last_token for ev in finals) - min(ev.arrival for ev in finals)

    def close(self):
        self.engine.shutdown()


def serving_dtype() -> torch.dtype:
    from nim_build.runtime.model import serving_compute_dtype

    return serving_compute_dtype("cpu")  # never None on CPU


class StaticBatch:
    """A peer whose `_run(prompts, n)` generates for all prompts as one batch: [start, each step's token time]."""

    concurrent_mode = "static batch"

    def stream(self, prompt, n):
        times = self._run([prompt], n)
        return times[0], times[1], times[-1]

    def batch(self, prompts, n):
        times = self._run(prompts, n)
        return times[-1] - times[0]

    def close(self):
        pass


class Clock:
    """A generate() streamer: the time of each put() (the prompt's first, then each step's new tokens)."""

    def __init__(self):
        self.times = [time.perf_counter()]

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Transformers(StaticBatch):
    def __init__(self, compute: str):
        import transformers

        transformers.logging.set_verbosity_error()
        self.compute = compute
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(), dtype=getattr(torch, compute)).eval()
        self.step_bytes = sum(m.weight.nbytes for m in self.model.modules() if isinstance(m, torch.nn.Linear))

    def _run(self, prompts, n):
        ids, clock = torch.tensor(prompts), Clock()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,  # never stops early
                do_sample=False,
                pad_token_id=self.model.config.eos_token_id,
                streamer=clock,
            )
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return [clock.times[0], *clock.times[2:]]  # times[1]: the prompt's put()


class OrtGenai(StaticBatch):
    def __init__(self, precision: str, compute: str):
        import onnxruntime_genai as og

        self.og, self.compute = og, compute
        out = REPO / ".cache" / "bench" / f"ortgenai-{precision}"
        if not (out / "genai_config.json").is_file():
            with open(f"{out}.log", "w") as log:
                cmd = ["-m", "onnxruntime_genai.models.builder", "-i", hf_dir(), "-o", out, "-p", precision]
                cmd += ["-e", "cpu", "-c", REPO / ".cache" / "bench" / "ortgenai-tmp"]
                subprocess.run([sys.executable, *map(str, cmd)], check=True, stdout=log, stderr=subprocess.STDOUT)
        config = og.Config(str(out))
        threads = {"intra_op_num_threads": torch.get_num_threads(), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.step_bytes = onnx_matmul_bytes(out / "model.onnx")

    def _run(self, prompts, n):
        import numpy as np

        ids = np.asarray(prompts, dtype=np.int32)
        params = self.og.GeneratorParams(self.model)
        length = ids.shape[1] + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(prompts))
        gen = self.og.Generator(self.model, params)
        times = [time.perf_counter()]
        gen.append_tokens(ids)  # the prefill; generate_next_token picks a token (after the first, runs a step too)
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter())
        assert len(gen.get_sequence(0)) == length and len(times) == n + 1, (len(gen.get_sequence(0)), len(times))
        return times


def onnx_matmul_bytes(path: Path) -> int:
    """Bytes of the initializers that the graph's MatMul / MatMulNBits nodes read: a decode step's weights."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path, load_external_data=False).graph
    size = {}
    for t in graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else numpy_helper.to_array(t).nbytes
    return sum(size.get(i, 0) for node in graph.node if node.op_type in ("MatMul", "MatMulNBits") for i in node.input)


def open_system(name: str, args):
    system, variant, compute = ROWS[name]
    if system == "nim_build":
        return NimBuild(variant, compute, args.concurrency)
    if system == "transformers":
        return Transformers(compute)
    return OrtGenai(variant, compute)


def measure(name: str, args) -> dict:
    """One row's raw numbers (run in the child process)."""
    sut = open_system(name, args)
    rng = random.Random(0)
    vocab = json.loads((hf_dir() / "config.json").read_text())["vocab_size"]
    prompt = lambda length: [rng.randrange(10, vocab) for _ in range(length)]  # noqa: E731
    short, long = prompt(args.prompt_len), prompt(args.long_prompt)
    many = [prompt(args.prompt_len) for _ in range(args.concurrency)]
    n, r = args.new_tokens, range(args.repeats)
    sut.stream(short, 8), sut.stream(long, 1), sut.batch(many, 4)  # warm-up: kernels, packing, allocator
    streams = [sut.stream(short, n) for _ in r]
    longs = [sut.stream(long, 1) for _ in r]
    walls = [sut.batch(many, n) for _ in r]
    sut.close()
    result = {
        "row": name,
        "system": ROWS[name][0],
        "variant": ROWS[name][1],
        "compute": sut.compute,
        "step_bytes": sut.step_bytes,
        "decode_tok_s": statistics.median((n - 1) / (last - first) for _, first, last in streams),
        "prefill_ms": statistics.median(first - start for start, first, _ in streams) * 1e3,
        "prefill_long_ms": statistics.median(first - start for start, first, _ in longs) * 1e3,
        "concurrent_tok_s": statistics.median(args.concurrency * n / w for w in walls),
        "concurrent_mode": sut.concurrent_mode,
    }
    del sut
    gc.collect()
    return result


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (stolen by the hypervisor included) and by our finished children."""
    user, nice, system, _, _, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime


def run_child(name: str, args) -> dict:
    """Measure one row in a process of its own; note how many CPUs other processes took meanwhile."""
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARDED]
    (all0, ours0), t0 = cpu_seconds(), time.monotonic()
    proc = subprocess.run([sys.executable, __file__, f"--rows={name}", "--child", *flags], stdout=subprocess.PIPE)
    (all1, ours1), wall = cpu_seconds(), time.monotonic() - t0
    lines = proc.stdout.decode().strip().splitlines()
    row = json.loads(lines[-1]) if lines and not proc.returncode else {"error": f"exit code {proc.returncode}"}
    return {"row": name, "system": ROWS[name][0], **row, "others_cpus": max(0.0, all1 - all0 - ours1 + ours0) / wall}


def merge_limits(a: dict, b: dict) -> dict:
    """The better of two measurements of the machine's limits (before and after the rows)."""
    gflops = {k: max(a["matmul_gflops"][k], b["matmul_gflops"][k]) for k in a["matmul_gflops"]}
    return {**a, "read_gbs": max(a["read_gbs"], b["read_gbs"]), "matmul_gflops": gflops, "runs": [a, b]}


def derive(row: dict, machine: dict, rows: list[dict], params: int, args) -> None:
    """Add the limits-relative columns to a measured row."""
    peak = machine["matmul_gflops"].get(row["compute"])
    row["prefill_long_gflops"] = 2 * params * args.long_prompt / (row["prefill_long_ms"] / 1e3) / 1e9
    row["prefill_long_pct_of_matmul"] = 100 * row["prefill_long_gflops"] / peak if peak else None
    row["decode_bw_limit_tok_s"] = machine["read_gbs"] * 1e9 / row["step_bytes"]
    row["decode_pct_of_bw_limit"] = 100 * row["decode_tok_s"] / row["decode_bw_limit_tok_s"]
    hf = next((r for r in rows if r["system"] == "transformers" and r.get("compute") == row["compute"]), None)
    ok = hf is not None and "error" not in hf
    row["concurrent_vs_hf_static"] = row["concurrent_tok_s"] / hf["concurrent_tok_s"] if ok else None


def fmt(v, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def print_table(machine: dict, rows: list[dict], args, argv: list[str]) -> None:
    m, busy = machine["matmul_gflops"], [r["row"] for r in rows if r["others_cpus"] > BUSY_CPUS]
    command = " ".join(["python", "bench/runtime.py", *argv])
    print(f"\n`{command}` — SmolLM2-135M-Instruct, greedy, {machine['threads']} threads,")
    print(f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, medians of {args.repeats}.")
    print(
        f"Machine: memory read {machine['read_gbs']:.1f} GB/s; matmul 2048^3 fp32 {m['float32']:.0f}, "
        f"bf16 {m['bfloat16']:.0f}, int8 {m['int8']:.0f} GFLOP/s (best of before and after the rows)."
    )
    if busy:
        print(f"Other processes took over {BUSY_CPUS} CPUs during {', '.join(busy)}: rerun on an idle machine.")
    print(
        f"\n| row | weights | compute | decode tok/s | BW limit tok/s (MB/step) | % of limit | "
        f"prefill {args.prompt_len} (ms) | prefill {args.long_prompt} (ms) | GFLOP/s | % of matmul | "
        f"{args.concurrency} concurrent tok/s | vs transformers static | others' CPUs |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | n/a: {r['error']} |" + " |" * 10 + f" {r['others_cpus']:.2f} |")
            continue
        print(
            f"| {r['row']} | {r['variant'] or 'bf16 (HF)'} | {r['compute']} | {r['decode_tok_s']:.1f} | "
            f"{fmt(r['decode_bw_limit_tok_s'])} ({r['step_bytes'] / 1e6:.0f}) | "
            f"{fmt(r['decode_pct_of_bw_limit'], '.0f', '%')} | {r['prefill_ms']:.0f} | {r['prefill_long_ms']:.0f} | "
            f"{r['prefill_long_gflops']:.0f} | {fmt(r['prefill_long_pct_of_matmul'], '.0f', '%')} | "
            f"{r['concurrent_tok_s']:.1f} ({r['concurrent_mode']}) | {fmt(r['concurrent_vs_hf_static'], '.2f', 'x')} | "
            f"{r['others_cpus']:.2f} |"
        )


BUSY_CPUS = 0.1  # other processes' mean CPU use during a row above which its numbers are suspect
FORWARDED = ("repeats", "new_tokens", "prompt_len", "long_prompt", "concurrency", "threads")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a markdown table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measure --rows here, print raw JSON
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    if unknown := set(names) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    os.environ["NIM_BUILD_THREADS"] = str(args.threads)  # DecoderModel.from_checkpoint sets torch's threads from it
    # onnxruntime writes a device id under $XDG_CACHE_HOME (default ~/.cache): keep it in this checkout's cache
    os.environ.setdefault("XDG_CACHE_HOME", str(REPO / ".cache" / "bench" / "xdg"))
    if args.child:
        for name in names:
            try:
                print(json.dumps(measure(name, args)), flush=True)
            except Exception as e:  # the row reports why it could not be measured; the other rows go on
                print(json.dumps({"row": name, "system": ROWS[name][0], "error": f"{type(e).__name__}: {e}"}))
        return
    before, rows = machine_limits(), []
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(run_child(name, args))
    machine = merge_limits(before, machine_limits())
    params = linear_params(hf_dir())
    for r in rows:
        if "error" not in r:
            derive(r, machine, rows, params, args)
    if args.json:
        command = ["python", "bench/runtime.py", *argv]
        print(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))
    else:
        print_table(machine, rows, args, argv)


if __name__ == "__main__":
    main()
