"""Prometheus metrics of a serving node, named as vLLM names them where vLLM has one."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.outputs import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServingMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats], extra: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency", labels,
                             buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time from arrival to first scheduling",
                               labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels,
                                         registry=r).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by reason",
                               labels + ["finished_reason"], registry=r)
        self.errors = Counter("pdserve:request_errors", "Requests rejected or failed, by HTTP status",
                              labels + ["status"], registry=r)
        tl = labels + ["transport"]
        self.transfers = Counter("pdserve:kv_transfers", "Remote prefills received", tl, registry=r)
        self.transfer_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes received from prefill nodes", tl,
                                      registry=r)
        self.transfer_tokens = Counter("pdserve:kv_transfer_tokens", "Prompt tokens prefilled remotely", tl,
                                       registry=r)
        self.transfer_seconds = Histogram("pdserve:kv_transfer_seconds", "Remote prefill + KV transfer time",
                                          tl, buckets=_LATENCY_BUCKETS, registry=r)
        self.transfer_failures = Counter("pdserve:kv_transfer_failures", "Failed remote prefills, by cause",
                                         labels + ["cause"], registry=r)
        self.fallbacks = Counter("pdserve:pd_local_prefills", "Prompts prefilled locally instead of remotely, "
                                 "by cause", labels + ["cause"], registry=r)
        self.model_name = model_name
        r.register(_EngineCollector(model_name, stats, extra))

    def transfer_done(self, transport: str, num_tokens: int, num_bytes: int, seconds: float) -> None:
        lab = (self.model_name, transport)
        self.transfers.labels(*lab).inc()
        self.transfer_bytes.labels(*lab).inc(num_bytes)
        self.transfer_tokens.labels(*lab).inc(num_tokens)
        self.transfer_seconds.labels(*lab).observe(seconds)

    def fallback(self, reason: str, is_failure: bool) -> None:
        cause = failure_cause(reason)
        if is_failure:
            self.transfer_failures.labels(self.model_name, cause).inc()
        self.fallbacks.labels(self.model_name, cause).inc()

    def finished(self, reason: str) -> None:
        self.success.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats], extra: Callable[[], dict] | None):
        self.model_name = model_name
        self.stats = stats
        self.extra = extra

    def collect(self) -> Iterable:
        s = self.stats()
        m = [self.model_name]
        yield _gauge("vllm:num_requests_running", "Requests in the running batch", s.num_running, m)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                     s.num_waiting + s.num_waiting_remote, m)
        yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", s.kv_usage, m)
        yield _gauge("pdserve:kv_blocks_free", "Free KV blocks (cached ones included)", s.num_free_blocks, m)
        yield _gauge("pdserve:kv_blocks_total", "KV blocks in the pool", s.num_blocks, m)
        yield _counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       s.prefix_queries, m)
        yield _counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_hits, m)
        yield _counter("vllm:num_preemptions", "Preemptions (recompute)", s.num_preemptions, m)
        for name, (value, kind, doc) in (self.extra() if self.extra else {}).items():
            yield (_gauge if kind == "gauge" else _counter)(name, doc, value, m)


def _gauge(name: str, doc: str, value: float, labels: list[str]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["model_name"])
    g.add_metric(labels, value)
    return g


def _counter(name: str, doc: str, value: float, labels: list[str]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["model_name"])
    c.add_metric(labels, value)
    return c


def failure_cause(reason: str) -> str:
    """A short, bounded label for a free-text failure reason."""
    r = reason.lower().replace("exceeded", "timeout").replace("deadline", "timeout")
    for cause in ("timeout", "unavailable", "refused", "corrupt", "short", "aborted", "no healthy"):
        if cause in r:
            return cause.replace(" ", "_")
    return "other"
