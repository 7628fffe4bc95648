"""Prometheus metrics of `cke-dist serve` (GET /metrics), through `prometheus-client`.

    metrics = ServerMetrics(engine)                  # a registry of its own per server
    metrics.observe(endpoint, status, ttft_s, latency_s)   # once per answered request
    body, content_type = metrics.exposition()

What it exports (names in vLLM's spirit, prefix cke_):
- cke_requests_total{endpoint, status}: answered requests by HTTP status;
- cke_time_to_first_token_seconds, cke_request_duration_seconds: histograms;
- cke_requests_waiting, cke_requests_running: the engine's queue and batch now;
- cke_prompt_tokens_total, cke_generation_tokens_total, and cke_generation_tokens_per_second over
  the last 10 s (rate() of the counter is the Prometheus way; the gauge is for a glance);
- cke_spec_decode_draft_tokens_total, cke_spec_decode_accepted_tokens_total (--speculative-tokens);
- cke_kv_cache_tokens{state="used"|"capacity"}: positions the running requests hold in the KV
  cache (slots x context) against its size;
- cke_comm_seconds_total{group}: time rank 0 spent in blocking tp / pp calls. Other ranks' time
  is not exported (they answer no HTTP).
Engine numbers are read at scrape time (a custom collector), so the engine keeps plain integers.
Tests: tests/integration/test_serve.py (parsed with prometheus_client's own parser).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    def __init__(self, engine_of):
        self.engine_of = engine_of

    def collect(self):
        engine = self.engine_of()
        if engine is None:
            return
        st = engine.stats()
        yield GaugeMetricFamily("cke_requests_waiting", "Requests queued for a cache slot", value=st["waiting"])
        yield GaugeMetricFamily("cke_requests_running", "Requests in the running batch", value=st["running"])
        yield CounterMetricFamily("cke_prompt_tokens", "Prompt tokens prefilled", value=st["prompt_tokens"])
        yield CounterMetricFamily("cke_generation_tokens", "Tokens sampled", value=st["generation_tokens"])
        yield CounterMetricFamily("cke_spec_decode_draft_tokens", "Prompt-lookup draft tokens proposed",
                                  value=st["draft_tokens"])
        yield CounterMetricFamily("cke_spec_decode_accepted_tokens", "Draft tokens the model agreed with",
                                  value=st["accepted_tokens"])
        yield GaugeMetricFamily("cke_generation_tokens_per_second", "Tokens sampled per second over the last 10 s",
                                value=st["tokens_per_second"])
        kv = GaugeMetricFamily("cke_kv_cache_tokens", "KV cache positions: held by running requests, and in all",
                               labels=["state"])
        kv.add_metric(["used"], st["kv_tokens_used"])
        kv.add_metric(["capacity"], st["kv_tokens_capacity"])
        yield kv
        comm = CounterMetricFamily("cke_comm_seconds", "Seconds rank 0 spent in blocking collectives",
                                   labels=["group"])
        for group, seconds in st["comm_seconds"].items():
            comm.add_metric([group], seconds)
        yield comm


class ServerMetrics:
    def __init__(self, engine_of):
        """engine_of: a callable returning the server's engine (None before it is built)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cke_requests", "Answered HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.ttft = Histogram("cke_time_to_first_token_seconds", "From the request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("cke_request_duration_seconds", "From the request to its last byte",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine_of))

    def observe(self, endpoint: str, status: int, latency_s: float, ttft_s: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
