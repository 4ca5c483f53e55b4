"""Prometheus metrics of the router: decisions, cache hits, retries, per-node load."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from pd.router.policy import Decision, NodeView, RouteRequest


class RouterMetrics:
    def __init__(self, nodes: Callable[[], list[NodeView]]):
        r = self.registry = CollectorRegistry()
        self.decisions = Counter("pdserve:router_decisions", "Routing decisions", ["policy", "reason"], registry=r)
        self.prompt_tokens = Counter("pdserve:router_prompt_tokens", "Prompt tokens routed", registry=r)
        self.cached_tokens = Counter("pdserve:router_cached_tokens",
                                     "Prompt tokens the chosen decode node already held (index)", registry=r)
        self.hits = Counter("pdserve:router_cache_hits", "Requests routed to a node holding part of the prompt",
                            registry=r)
        self.misses = Counter("pdserve:router_cache_misses", "Requests routed with nothing cached", registry=r)
        self.remote_prefills = Counter("pdserve:router_remote_prefills", "Requests sent with a prefill node",
                                       registry=r)
        self.latency = Histogram("pdserve:router_decision_seconds", "Time to choose nodes", registry=r,
                                 buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2))
        self.retries = Counter("pdserve:router_retries", "Requests retried on another decode node", registry=r)
        self.upstream_errors = Counter("pdserve:router_upstream_errors", "Decode nodes failing mid-stream",
                                       registry=r)
        r.register(_NodeCollector(nodes))

    def decision(self, policy: str, d: Decision, req: RouteRequest, seconds: float) -> None:
        self.decisions.labels(policy, d.reason).inc()
        self.prompt_tokens.inc(req.num_tokens)
        self.cached_tokens.inc(d.cached_tokens)
        (self.hits if d.cached_tokens else self.misses).inc()
        if d.prefill is not None:
            self.remote_prefills.inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    def __init__(self, nodes: Callable[[], list[NodeView]]):
        self.nodes = nodes

    def collect(self) -> Iterable:
        load = GaugeMetricFamily("pdserve:router_node_load", "Load score per node", labels=["node", "role"])
        up = GaugeMetricFamily("pdserve:router_node_up", "1 if the node is routable", labels=["node", "role"])
        for n in self.nodes():
            load.add_metric([n.node_id, n.role], n.load)
            up.add_metric([n.node_id, n.role], 1.0 if n.healthy else 0.0)
        yield load
        yield up
