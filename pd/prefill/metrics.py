"""Prometheus metrics of a prefill node: the engine's, plus transfers by transport."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from pd.decode.metrics import ServingMetrics


class PrefillMetrics(ServingMetrics):
    def __init__(self, model_name: str, stats, extra=None):
        super().__init__(model_name, stats, extra)
        labels = ["model_name", "transport"]
        self.transfers = Counter("pdserve:prefill_transfers", "Prefills streamed to decode nodes", labels,
                                 registry=self.registry)
        self.kv_bytes = Counter("pdserve:prefill_kv_bytes_sent", "KV bytes sent (grpc transport)", labels,
                                registry=self.registry)
        self.tokens = Counter("pdserve:prefill_tokens", "Prompt tokens prefilled for decode nodes", labels,
                              registry=self.registry)
        self.duration = Histogram("pdserve:prefill_transfer_seconds", "Prefill stream duration", labels,
                                  registry=self.registry)

    def prefill_done(self, transport: str, num_tokens: int, num_bytes: int, seconds: float) -> None:
        lab = (self.model_name, transport)
        self.transfers.labels(*lab).inc()
        self.kv_bytes.labels(*lab).inc(num_bytes)
        self.tokens.labels(*lab).inc(num_tokens)
        self.duration.labels(*lab).observe(seconds)
