"""/v1/metrics: Prometheus metrics under NIM's names, each with a `model_name` label.

Request counts, token counts and latencies are the frontend's own. The engine's running/waiting requests and its
KV-cache use come from Triton's metrics port at scrape time (nim_build.serving.server.engine_stats: the reference
runtime's `nim_build_engine` gauges, or TensorRT-LLM's `nv_trt_llm_*` metrics); without either, running counts the
frontend's requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from nim_build.serving.server import engine_stats, metrics_text

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60)


class Metrics:
    def __init__(self, model_name: str, triton_metrics_url: str | None):
        self.model_name, self.triton_metrics_url = model_name, triton_metrics_url
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.success = counter("request_success", "Requests that completed")
        self.failure = counter("request_failure", "Requests that failed")
        self.ttft = histogram("time_to_first_token_seconds", "Time to the first generated token")
        self.tpot = histogram("time_per_output_token_seconds", "Time per generated token after the first")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, end to end")
        self.in_flight = 0  # the frontend's own generations, for engines that export nothing
        r.register(self)

    def collect(self):
        stats = self._engine_stats()
        running = GaugeMetricFamily("num_requests_running", "Requests the engine is running", labels=["model_name"])
        waiting = GaugeMetricFamily("num_requests_waiting", "Requests waiting for the engine", labels=["model_name"])
        cache = GaugeMetricFamily(
            "gpu_cache_usage_perc", "KV-cache use, 0 to 1 (on CPU: the reference runtime's pool)", labels=["model_name"]
        )
        running.add_metric([self.model_name], stats.get("running", self.in_flight))
        waiting.add_metric([self.model_name], stats.get("waiting", 0.0))
        cache.add_metric([self.model_name], stats.get("cache", 0.0))
        yield from (running, waiting, cache)

    def _engine_stats(self) -> dict[str, float]:
        if not self.triton_metrics_url:
            return {}
        try:
            return engine_stats(metrics_text(self.triton_metrics_url, timeout_s=2))
        except OSError:
            return {}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
