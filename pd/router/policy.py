"""Routing policies: pick a decode node and (optionally) a prefill node for a request.

The same code runs in pd-router and in the cluster simulator (pd.router.simulate).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pd.router.index import ResidencyIndex


@dataclass
class NodeView:
    node_id: str
    role: str                   # "prefill" | "decode"
    address: str
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 1
    num_blocks: int = 1
    inflight: int = 0           # requests the router has sent and not seen finish

    @property
    def load(self) -> float:
        """Queue pressure plus KV pressure, in units of 'requests'."""
        kv = 1.0 - self.num_free_blocks / max(self.num_blocks, 1)
        return self.num_running + 2 * self.num_waiting + self.inflight + 4 * kv


@dataclass
class RouteRequest:
    block_hashes: list[int]
    num_tokens: int
    block_size: int
    session_key: str | None = None


@dataclass
class Decision:
    decode: NodeView
    prefill: NodeView | None
    reason: str
    cached_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)


class Policy:
    name = "base"

    def __init__(self, min_remote_prefill_tokens: int = 128):
        self.min_remote_prefill_tokens = min_remote_prefill_tokens

    def choose(self, req: RouteRequest, decodes: list[NodeView], prefills: list[NodeView],
               index: ResidencyIndex) -> Decision:
        raise NotImplementedError

    def _wants_remote(self, req: RouteRequest, cached_tokens: int) -> bool:
        return req.num_tokens - cached_tokens >= self.min_remote_prefill_tokens


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, min_remote_prefill_tokens: int = 128):
        super().__init__(min_remote_prefill_tokens)
        self._d = itertools.count()
        self._p = itertools.count()

    def choose(self, req, decodes, prefills, index) -> Decision:
        decode = decodes[next(self._d) % len(decodes)]
        matched = index.match(req.block_hashes, [decode.node_id]).get(decode.node_id, 0) * req.block_size
        prefill = prefills[next(self._p) % len(prefills)] if prefills and self._wants_remote(req, matched) else None
        return Decision(decode, prefill, "round robin", matched)


class LeastLoad(Policy):
    name = "least_load"

    def choose(self, req, decodes, prefills, index) -> Decision:
        decode = min(decodes, key=_load)
        matched = index.match(req.block_hashes, [decode.node_id]).get(decode.node_id, 0) * req.block_size
        prefill = (min(prefills, key=_load)
                   if prefills and self._wants_remote(req, matched) else None)
        return Decision(decode, prefill, "least load", matched, {decode.node_id: decode.load})


class CacheAware(Policy):
    """Session affinity, then cached prefix against load (for decode and prefill nodes)."""

    name = "cache_aware"

    def __init__(self, min_remote_prefill_tokens: int = 128, load_weight: float = 0.02,
                 max_imbalance: float = 2.0):
        super().__init__(min_remote_prefill_tokens)
        self.load_weight = load_weight      # cached fraction worth one unit of load
        self.max_imbalance = max_imbalance  # beyond this load gap, ignore the cache

    def choose(self, req, decodes, prefills, index) -> Decision:
        hits = index.match(req.block_hashes) if req.block_hashes else {}  # one walk, both roles
        if req.session_key:
            owner = index.session_node(req.session_key)
            node = next((n for n in decodes if n.node_id == owner), None) if owner else None
            if node is not None and node.healthy:
                matched = hits.get(node.node_id, 0) * req.block_size
                return Decision(node, self._pick_prefill(req, matched, prefills, hits), "session affinity",
                                matched)
        decode, score, matched = self._best(req, decodes, hits)
        reason = "cached prefix" if matched else "least load"
        return Decision(decode, self._pick_prefill(req, matched, prefills, hits), reason, matched,
                        {decode.node_id: score})

    def _best(self, req: RouteRequest, nodes: list[NodeView], hits: dict[str, int]
              ) -> tuple[NodeView, float, int]:
        """Highest (cached fraction - load_weight * load); a node more than max_imbalance above
        the least loaded one gets no credit for its cache. One load evaluation per node."""
        loads = [n.load for n in nodes]
        min_load = min(loads)
        total = max(len(req.block_hashes), 1)
        lw, limit = self.load_weight, min_load + self.max_imbalance
        best_i, best_score = 0, float("-inf")
        for i, n in enumerate(nodes):
            load = loads[i]
            cached = hits.get(n.node_id, 0) / total if hits and load <= limit else 0.0
            score = cached - lw * load
            if score > best_score:
                best_i, best_score = i, score
        best = nodes[best_i]
        return best, best_score, hits.get(best.node_id, 0) * req.block_size

    def _pick_prefill(self, req, decode_cached: int, prefills, hits: dict[str, int]) -> NodeView | None:
        if not prefills or not self._wants_remote(req, decode_cached):
            return None
        node, _, _ = self._best(req, prefills, hits)
        return node


def _load(node: NodeView) -> float:
    return node.load


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastLoad, CacheAware)}


def make_policy(name: str, min_remote_prefill_tokens: int = 128, **options: float) -> Policy:
    """A policy by name; options go to its constructor (e.g. load_weight, max_imbalance)."""
    try:
        return POLICIES[name](min_remote_prefill_tokens, **options)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
