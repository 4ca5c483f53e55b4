"""Cluster simulator for the router: the real policies and residency index, simulated workers.

    python -m pd.router.simulate --nodes 64 --policy all
    python -m pd.router.simulate --sweep 8,64,1024 --policy all

A discrete-event simulation (an event heap in simulated seconds; nothing sleeps) of N decode
nodes and N/2 prefill nodes behind `pd.router.policy` and `pd.router.index`, imported, not
copied. Each simulated worker keeps what a real one keeps (engine/kv_cache/block_pool.py
and session_cache.py): a KV pool of `--kv-blocks` blocks whose full blocks are findable by
their chained hash (engine/kv_cache/prefix_hash.chain_hashes) until reused in LRU order,
reference counts that pin blocks while a request or a resident session uses them, and
sessions that keep a conversation's blocks until evicted least-recently-used under KV
pressure. It reports to the router's index exactly the events a real worker streams:
stored / removed block hashes and session resident / evicted.

Workload: Poisson session arrivals; each session picks one of K shared system prompts and
runs several turns with think time between them. A turn's prompt is the system prompt plus
every previous turn (user message and assistant reply) plus the new user message, so a turn
routed to the node that served the previous one finds all but its new message cached.

Time model: prefill = a + b * tokens not cached on the node computing it; decode =
out_len * (c + d * running requests on the node, counted when it starts). Decode admission
is bounded by --max-batch and by the blocks reserved for running requests; a prefill node
runs --prefill-slots prefills at a time, FIFO. Loads (num_running, num_waiting, inflight,
num_free_blocks) are written into NodeView objects built once, which the policy reads.

Metrics: hit rate (prompt tokens found cached, as leading full blocks, on the chosen decode
node when routed / prompt tokens), the same on the chosen prefill node for remotely
prefilled requests, load imbalance (every --sample-every decisions: max / mean NodeView.load
over healthy decode nodes, p50 / p99 over samples, and the mean coefficient of variation;
samples are taken while the mean load is at least --imbalance-min-load, since on a nearly
idle cluster, ramp-up and drain, max / mean measures granularity, not balance),
and the router's decision latency around policy.choose, index.match included: wall clock
(perf_counter) and the router thread's CPU time (thread_time), which other processes on a
busy host cannot inflate; the 1 ms target is judged on the CPU figure.

The policy is handed the usable nodes only, as pd-router does (Registry.usable), and, as
pd-router does, the router records a session on the decode node it forwards a turn to
(index.session_resident) besides the workers' own events. --fail-nodes K loses K decode
nodes mid-run: the router marks them down and purges them from the index (Registry.mark_down),
drops them from the usable lists, and routes their requests again.

Cost: the simulator's own work per request is O(prompt blocks), never O(nodes), apart from
load sampling every --sample-every decisions; the policies' own per-decision cost is what
the latency columns measure. --jobs N runs the (size, policy) runs in N processes.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, replace

from engine.kv_cache.prefix_hash import chain_hashes
from pd.router.index import ResidencyIndex
from pd.router.policy import POLICIES, NodeView, RouteRequest, make_policy

perf_counter = time.perf_counter
thread_time = time.thread_time

HIT_RATIO_TARGET = 2.0          # cache_aware hit rate >= 2x round_robin's
LATENCY_TARGET_US = 1000.0      # p99 decision latency at 1,024 nodes
LATENCY_TARGET_NODES = 1024

_TURN, _PREFILL_DONE, _DECODE_ARRIVE, _DECODE_DONE, _FAIL = range(5)
POLICY_NAMES = list(POLICIES)


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 8                       # decode nodes
    prefill_nodes: int | None = None     # default nodes // 2
    policy: str = "cache_aware"
    sessions: int | None = None          # default sessions_per_node * nodes
    sessions_per_node: int = 8
    turns: int = 6
    rate: float | None = None            # session arrivals per second; default rate_per_node * nodes
    rate_per_node: float = 0.5
    think_time: float = 3.0              # mean seconds between a reply and the next user turn
    system_prompts: int = 8
    system_len: int = 512
    user_len: int = 128                  # mean tokens of a user message (lognormal)
    output_len: int = 192                # mean tokens of a reply (lognormal)
    len_sigma: float = 0.6
    block_size: int = 16
    kv_blocks: int = 4096                # per decode node
    prefill_kv_blocks: int | None = None  # per prefill node; default kv_blocks
    max_batch: int = 64
    prefill_slots: int = 1
    min_remote_prefill_tokens: int = 128
    prefill_a: float = 0.02              # s
    prefill_b: float = 5e-5              # s per computed prompt token
    decode_c: float = 0.01               # s per output token
    decode_d: float = 5e-4               # s per output token per running request
    transfer_per_token: float = 2e-6     # s per transferred prompt token (prefill -> decode)
    session_ids: bool = True
    fail_nodes: int = 0                  # decode nodes lost mid-run
    fail_at: float | None = None         # s; default: when the middle session arrives
    sample_every: int = 32
    imbalance_min_load: float = 1.0      # load samples need a mean NodeView.load at least this
    seed: int = 0

    @property
    def num_prefill(self) -> int:
        return self.nodes // 2 if self.prefill_nodes is None else self.prefill_nodes

    @property
    def num_sessions(self) -> int:
        return self.sessions if self.sessions is not None else self.sessions_per_node * self.nodes

    @property
    def arrival_rate(self) -> float:
        return self.rate if self.rate is not None else self.rate_per_node * self.nodes

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        for name in ("nodes", "turns", "block_size", "kv_blocks", "max_batch", "prefill_slots",
                     "sample_every", "system_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_prefill < 0 or self.num_sessions < 1 or self.arrival_rate <= 0:
            raise ValueError("need prefill nodes >= 0, sessions >= 1 and a positive rate")
        if not 0 <= self.fail_nodes < self.nodes:
            raise ValueError("--fail-nodes must be at least 0 and less than --nodes")


# ---- workload ---------------------------------------------------------------------------

@dataclass
class SessionSpec:
    sid: int
    arrival: float
    system: int
    user_lens: list[int]
    output_lens: list[int]
    think: list[float]


class Workload:
    """Everything random about a run, drawn from the seed alone (identical for every policy)."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        bs = cfg.block_size
        self.system_tokens: list[array] = []
        self.system_hashes: list[list[int]] = []
        for k in range(cfg.system_prompts):
            toks = array("H", random.Random(f"system-{cfg.seed}-{k}").randbytes(2 * cfg.system_len))
            self.system_tokens.append(toks)
            self.system_hashes.append(chain_hashes(toks, bs))
        self.sessions: list[SessionSpec] = []
        t = 0.0
        for sid in range(cfg.num_sessions):
            t += rng.expovariate(cfg.arrival_rate)
            self.sessions.append(SessionSpec(
                sid, t, rng.randrange(cfg.system_prompts),
                [self._length(rng, cfg.user_len) for _ in range(cfg.turns)],
                [self._length(rng, cfg.output_len) for _ in range(cfg.turns)],
                [rng.expovariate(1.0 / cfg.think_time) if cfg.think_time > 0 else 0.0
                 for _ in range(cfg.turns)]))

    def _length(self, rng: random.Random, mean: int) -> int:
        sigma = self.cfg.len_sigma
        x = rng.lognormvariate(math.log(max(mean, 1)) - sigma * sigma / 2, sigma)
        return max(1, min(int(round(x)), 8 * mean))

    def token_rng(self, sid: int) -> random.Random:
        return random.Random(self.cfg.seed * 1_000_003 + sid)


class _Session:
    __slots__ = ("spec", "key", "rng", "tokens", "hashes", "turn")

    def __init__(self, spec: SessionSpec, wl: Workload, with_key: bool):
        self.spec = spec
        self.key = f"s{spec.sid}" if with_key else None
        self.rng = wl.token_rng(spec.sid)
        self.tokens = array("H", wl.system_tokens[spec.system])
        self.hashes = wl.system_hashes[spec.system]
        self.turn = 0


class _Request:
    __slots__ = ("session", "prompt_len", "hashes", "out_len", "arrival", "decode", "prefill",
                 "reserve", "first_token", "uncached_local")

    def __init__(self, session, prompt_len, hashes, out_len, arrival):
        self.session = session
        self.prompt_len = prompt_len
        self.hashes = hashes
        self.out_len = out_len
        self.arrival = arrival
        self.decode = None
        self.prefill = None
        self.reserve = 0
        self.first_token = 0.0
        self.uncached_local = 0


# ---- simulated workers ------------------------------------------------------------------

class SimNode:
    """One worker's KV pool (LRU of free cached blocks + pinned blocks), sessions and queues."""

    __slots__ = ("view", "node_id", "capacity", "index", "free_lru", "pinned", "sessions",
                 "running", "waiting", "in_service", "reserved", "busy", "evictions",
                 "session_evictions", "overflow", "dead")

    def __init__(self, view: NodeView, capacity: int, index: ResidencyIndex):
        self.view = view
        self.node_id = view.node_id
        self.capacity = capacity
        self.index = index
        self.free_lru: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced; LRU first
        self.pinned: dict[int, int] = {}                         # cached, referenced: hash -> refs
        self.sessions: OrderedDict[str, list[int]] = OrderedDict()  # key -> pinned hashes; LRU first
        self.running = 0
        self.waiting: deque[_Request] = deque()
        self.in_service: dict[_Request, None] = {}   # running on this decode node
        self.reserved = 0        # blocks reserved by running requests (decode admission)
        self.busy = 0            # prefills in progress (prefill nodes)
        self.evictions = 0
        self.session_evictions = 0
        self.overflow = 0
        self.dead = False

    def leading_cached(self, hashes: list[int]) -> int:
        pinned, lru = self.pinned, self.free_lru
        n = 0
        for h in hashes:
            if h in pinned or h in lru:
                n += 1
            else:
                break
        return n

    def pin(self, hashes: list[int], keep: str | None = None) -> None:
        """Takes a reference on each block, storing the ones not cached (LRU eviction first)."""
        pinned, lru = self.pinned, self.free_lru
        new: list[int] = []
        for h in hashes:
            r = pinned.get(h)
            if r is not None:
                pinned[h] = r + 1
            elif h in lru:
                del lru[h]
                pinned[h] = 1
            else:
                new.append(h)
        if not new:
            return
        self._make_room(len(new), keep)
        for h in new:
            pinned[h] = 1
        self.index.stored(self.node_id, new)

    def unpin(self, hashes: list[int]) -> None:
        """Drops a reference from each block, tail first (so tails are evicted first)."""
        pinned, lru = self.pinned, self.free_lru
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            r = pinned[h]
            if r == 1:
                del pinned[h]
                lru[h] = None
            else:
                pinned[h] = r - 1

    def _make_room(self, n: int, keep: str | None) -> None:
        over = len(self.free_lru) + len(self.pinned) + n - self.capacity
        if over <= 0:
            return
        lru = self.free_lru
        evicted: list[int] = []
        while over > 0:
            if lru:
                evicted.append(lru.popitem(last=False)[0])
                over -= 1
            elif not self._evict_session(keep):
                self.overflow += over      # everything pinned by running requests
                break
        if evicted:
            self.evictions += len(evicted)
            self.index.removed(self.node_id, evicted)

    def _evict_session(self, keep: str | None) -> bool:
        for key in self.sessions:
            if key != keep:
                self.unpin(self.sessions.pop(key))
                self.session_evictions += 1
                self.index.session_evicted(self.node_id, key)
                return True
        return False

    def sync_view(self) -> None:
        v = self.view
        v.num_running = self.running + self.busy
        v.num_waiting = len(self.waiting)
        v.num_free_blocks = max(self.capacity - len(self.pinned), 0)


# ---- the simulation ---------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


class Simulation:
    def __init__(self, cfg: SimConfig, workload: Workload | None = None):
        cfg.validate()
        self.cfg = cfg
        self.wl = workload or Workload(cfg)
        self.index = ResidencyIndex()
        self.policy = make_policy(cfg.policy, cfg.min_remote_prefill_tokens)
        pcap = cfg.prefill_kv_blocks or cfg.kv_blocks
        # Built once; loads are written into these objects in place (what a registry would do).
        self.decode_views = [NodeView(f"d{i}", "decode", f"sim://d{i}", num_free_blocks=cfg.kv_blocks,
                                      num_blocks=cfg.kv_blocks) for i in range(cfg.nodes)]
        self.prefill_views = [NodeView(f"p{i}", "prefill", f"sim://p{i}", num_free_blocks=pcap,
                                       num_blocks=pcap) for i in range(cfg.num_prefill)]
        self.healthy_decodes = self.decode_views      # re-built when a node is lost
        self.healthy_prefills = self.prefill_views
        self.nodes: dict[str, SimNode] = {}
        for v in self.decode_views:
            self.nodes[v.node_id] = SimNode(v, cfg.kv_blocks, self.index)
        for v in self.prefill_views:
            self.nodes[v.node_id] = SimNode(v, pcap, self.index)
        self._heap: list = []
        self._seq = 0
        self.now = 0.0
        # metrics
        self.latencies_us: list[float] = []      # wall clock (perf_counter)
        self.cpu_latencies_us: list[float] = []  # this thread's CPU time (immune to preemption)
        self.imbalance: list[float] = []
        self.cv: list[float] = []
        self.ttft: list[float] = []
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.remote_prompt_tokens = 0
        self.prefill_hit_tokens = 0
        self.remote_requests = 0
        self.decisions = 0
        self.affinity_decisions = 0
        self.completed = 0
        self.output_tokens = 0
        self.index_mismatches = 0
        self.rerouted = 0        # requests routed again because their decode node was lost
        self.failed_nodes: list[str] = []

    def _push(self, t: float, kind: int, obj) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    # ---- run ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        for spec in self.wl.sessions:
            self._push(spec.arrival, _TURN, _Session(spec, self.wl, cfg.session_ids))
        if cfg.fail_nodes:
            at = cfg.fail_at if cfg.fail_at is not None else self.wl.sessions[len(self.wl.sessions) // 2].arrival
            self._push(at, _FAIL, None)
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        heap = self._heap
        pop = heapq.heappop
        while heap:
            t, _, kind, obj = pop(heap)
            self.now = t
            if kind == _TURN:
                self._turn(obj)
            elif kind == _DECODE_DONE:
                self._decode_done(obj)
            elif kind == _PREFILL_DONE:
                self._prefill_done(obj)
            elif kind == _DECODE_ARRIVE:
                self._decode_arrive(obj)
            else:
                self._fail()
        return self._report(time.perf_counter() - wall0, time.process_time() - cpu0)

    def _turn(self, s: _Session) -> None:
        spec = s.spec
        s.tokens.frombytes(s.rng.randbytes(2 * spec.user_lens[s.turn]))
        hashes = chain_hashes(s.tokens, self.cfg.block_size, prefix=s.hashes)
        self._route(_Request(s, len(s.tokens), hashes, spec.output_lens[s.turn], self.now))

    def _route(self, req: _Request) -> None:
        cfg = self.cfg
        rr = RouteRequest(req.hashes, req.prompt_len, cfg.block_size, req.session.key)
        # like pd-router (server.py, Registry.usable), the policy gets the usable nodes only
        c0 = thread_time()
        t0 = perf_counter()
        d = self.policy.choose(rr, self.healthy_decodes, self.healthy_prefills, self.index)
        t1 = perf_counter()
        c1 = thread_time()
        self.latencies_us.append((t1 - t0) * 1e6)
        self.cpu_latencies_us.append((c1 - c0) * 1e6)
        if not d.decode.healthy or (d.prefill is not None and not d.prefill.healthy):
            raise AssertionError(f"{self.policy.name} chose a node that was not offered to it")
        if rr.session_key:
            # pd-router records the session on the node it forwarded to as soon as the node accepts
            self.index.session_resident(d.decode.node_id, rr.session_key)
        self.decisions += 1
        if d.reason == "session affinity":
            self.affinity_decisions += 1
        dec = self.nodes[d.decode.node_id]
        hit = dec.leading_cached(req.hashes) * cfg.block_size
        if hit != d.cached_tokens:
            self.index_mismatches += 1
        self.prompt_tokens += req.prompt_len
        self.hit_tokens += hit
        req.decode = dec
        req.prefill = None
        dec.view.inflight += 1
        if d.prefill is not None:
            pf = self.nodes[d.prefill.node_id]
            req.prefill = pf
            self.remote_requests += 1
            self.remote_prompt_tokens += req.prompt_len
            self.prefill_hit_tokens += pf.leading_cached(req.hashes) * cfg.block_size
            pf.waiting.append(req)
            self._start_prefills(pf)
        else:
            self._decode_arrive(req)
        if self.decisions % cfg.sample_every == 0:
            self._sample_load()

    def _sample_load(self) -> None:
        loads = [v.load for v in self.decode_views if v.healthy]
        if not loads:
            return
        mean = sum(loads) / len(loads)
        if mean < self.cfg.imbalance_min_load:
            return                       # a nearly idle cluster: max/mean would measure granularity
        var = sum((x - mean) * (x - mean) for x in loads) / len(loads)
        self.imbalance.append(max(loads) / mean)
        self.cv.append(math.sqrt(var) / mean)

    # ---- prefill nodes --------------------------------------------------------------------
    def _start_prefills(self, pf: SimNode) -> None:
        cfg = self.cfg
        while pf.waiting and pf.busy < cfg.prefill_slots:
            req = pf.waiting.popleft()
            pf.busy += 1
            cached = pf.leading_cached(req.hashes) * cfg.block_size
            pf.pin(req.hashes)
            dt = cfg.prefill_a + cfg.prefill_b * (req.prompt_len - cached)
            self._push(self.now + dt, _PREFILL_DONE, req)
        pf.sync_view()

    def _prefill_done(self, req: _Request) -> None:
        pf = req.prefill
        pf.unpin(req.hashes)
        pf.busy -= 1
        self._start_prefills(pf)
        req.first_token = self.now
        dec = req.decode
        transfer = req.prompt_len - dec.leading_cached(req.hashes) * self.cfg.block_size
        self._push(self.now + self.cfg.transfer_per_token * transfer, _DECODE_ARRIVE, req)

    # ---- decode nodes ---------------------------------------------------------------------
    def _decode_arrive(self, req: _Request) -> None:
        dec = req.decode
        if dec.dead:
            self.rerouted += 1
            self._route(req)
            return
        dec.view.inflight -= 1
        bs = self.cfg.block_size
        req.reserve = (req.prompt_len + req.out_len + bs - 1) // bs
        dec.waiting.append(req)
        self._admit(dec)

    def _admit(self, dec: SimNode) -> None:
        cfg = self.cfg
        while dec.waiting and dec.running < cfg.max_batch:
            req = dec.waiting[0]
            if dec.running and dec.reserved + req.reserve > dec.capacity:
                break
            dec.waiting.popleft()
            dec.running += 1
            dec.reserved += req.reserve
            dec.in_service[req] = None
            key = req.session.key
            dt = 0.0
            if req.prefill is None:
                cached = dec.leading_cached(req.hashes) * cfg.block_size
                dt = cfg.prefill_a + cfg.prefill_b * (req.prompt_len - cached)
                req.first_token = self.now + dt
            if key is not None and key in dec.sessions:
                dec.sessions.move_to_end(key)
            dec.pin(req.hashes, keep=key)
            dt += req.out_len * (cfg.decode_c + cfg.decode_d * dec.running)
            self._push(self.now + dt, _DECODE_DONE, req)
        dec.sync_view()

    def _decode_done(self, req: _Request) -> None:
        dec = req.decode
        if dec.dead:
            return                       # lost with its node; already routed again
        cfg = self.cfg
        s = req.session
        self.completed += 1
        self.ttft.append(req.first_token - req.arrival)
        self.output_tokens += req.out_len
        dec.running -= 1
        dec.reserved -= req.reserve
        del dec.in_service[req]
        # the reply's full blocks are stored as decoding fills them
        s.tokens.frombytes(s.rng.randbytes(2 * req.out_len))
        full = chain_hashes(s.tokens, cfg.block_size, prefix=req.hashes)
        key = s.key
        dec.pin(full[len(req.hashes):], keep=key)
        if key is not None:
            # the session takes over the request's references (SessionCache.store): "resident"
            # is reported only when the session is new on this node
            old = dec.sessions.pop(key, None)
            dec.sessions[key] = full
            if old is not None:
                dec.unpin(old)
            else:
                self.index.session_resident(dec.node_id, key)
        else:
            dec.unpin(full)
        s.hashes = full
        self._admit(dec)
        s.turn += 1
        if s.turn < cfg.turns:
            self._push(self.now + s.spec.think[s.turn - 1], _TURN, s)
        else:
            s.tokens = None

    # ---- node loss --------------------------------------------------------------------------
    def _fail(self) -> None:
        """Decode nodes die: the router marks them down and purges them from its index, and
        their requests are routed again."""
        cfg = self.cfg
        rng = random.Random(cfg.seed + 7919)
        victims = rng.sample(range(cfg.nodes), cfg.fail_nodes)
        lost: list[_Request] = []
        for i in sorted(victims):
            view = self.decode_views[i]
            node = self.nodes[view.node_id]
            node.dead = True
            view.healthy = False
            self.index.purge(view.node_id)
            self.failed_nodes.append(view.node_id)
            # fresh request objects: the lost ones' pending completion events stay dead
            lost.extend(_Request(r.session, r.prompt_len, r.hashes, r.out_len, r.arrival)
                        for r in (*node.waiting, *node.in_service))
            node.waiting.clear()
            node.in_service.clear()
            node.running = node.reserved = 0
            node.free_lru.clear()
            node.pinned.clear()
            node.sessions.clear()
        self.healthy_decodes = [v for v in self.decode_views if v.healthy]
        lost.sort(key=lambda r: (r.arrival, r.session.spec.sid))
        for req in lost:
            self.rerouted += 1
            self._route(req)

    # ---- report ---------------------------------------------------------------------------
    def _report(self, wall_s: float, cpu_s: float) -> dict:
        cfg = self.cfg
        lat, cpu = self.latencies_us, self.cpu_latencies_us
        dec_nodes = [self.nodes[v.node_id] for v in self.decode_views]
        return {
            "nodes": cfg.nodes,
            "prefill_nodes": cfg.num_prefill,
            "policy": cfg.policy,
            "session_ids": cfg.session_ids,
            "sessions": cfg.num_sessions,
            "requests": self.completed,
            "decisions": self.decisions,
            "hit_rate": self.hit_tokens / max(self.prompt_tokens, 1),
            "prefill_hit_rate": (self.prefill_hit_tokens / self.remote_prompt_tokens
                                 if self.remote_prompt_tokens else None),
            "remote_prefill_frac": self.remote_requests / max(self.decisions, 1),
            "affinity_frac": self.affinity_decisions / max(self.decisions, 1),
            "imbalance_p50": _pct(self.imbalance, 50),
            "imbalance_p99": _pct(self.imbalance, 99),
            "load_cv": statistics.fmean(self.cv) if self.cv else float("nan"),
            "load_samples": len(self.imbalance),
            "latency_us_p50": _pct(lat, 50),
            "latency_us_p99": _pct(lat, 99),
            "latency_us_max": max(lat) if lat else float("nan"),
            "cpu_latency_us_p50": _pct(cpu, 50),
            "cpu_latency_us_p99": _pct(cpu, 99),
            "ttft_ms_p50": _pct(self.ttft, 50) * 1e3,
            "ttft_ms_p99": _pct(self.ttft, 99) * 1e3,
            "sim_seconds": self.now,
            "output_tok_per_s": self.output_tokens / self.now if self.now > 0 else 0.0,
            "block_evictions": sum(n.evictions for n in self.nodes.values()),
            "session_evictions": sum(n.session_evictions for n in dec_nodes),
            "kv_overflow_blocks": sum(n.overflow for n in self.nodes.values()),
            "index_mismatches": self.index_mismatches,
            "index_entries": self.index.num_entries,
            "failed_nodes": len(self.failed_nodes),
            "rerouted": self.rerouted,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
        }


def simulate(cfg: SimConfig, workload: Workload | None = None) -> dict:
    return Simulation(cfg, workload).run()


def compare(cfg: SimConfig, policies: list[str]) -> list[dict]:
    """Each policy on the identical workload."""
    wl = Workload(cfg)
    return [simulate(replace(cfg, policy=p), wl) for p in policies]


def run_many(cfgs: list[SimConfig], jobs: int = 1) -> list[dict]:
    """Results in the order given; with jobs > 1, runs go to worker processes (each rebuilds
    the workload from the seed, so it is identical; timings then share the machine's cores)."""
    if jobs <= 1 or len(cfgs) <= 1:
        out, wls = [], {}
        for cfg in cfgs:
            key = replace(cfg, policy=POLICY_NAMES[0])
            if key not in wls:
                wls = {key: Workload(cfg)}
            out.append(simulate(cfg, wls[key]))
        return out
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(simulate, cfgs))


# ---- output -----------------------------------------------------------------------------

_COLUMNS = [
    ("nodes", "nodes", "{:d}"), ("policy", "policy", "{}"), ("requests", "reqs", "{:d}"),
    ("hit_rate", "hit%", "pct"), ("prefill_hit_rate", "pf-hit%", "pct"),
    ("remote_prefill_frac", "remote%", "pct"), ("imbalance_p50", "imb-p50", "{:.2f}"),
    ("imbalance_p99", "imb-p99", "{:.2f}"), ("load_cv", "load-CV", "{:.2f}"),
    ("latency_us_p50", "lat-p50us", "{:.0f}"), ("latency_us_p99", "lat-p99us", "{:.0f}"),
    ("cpu_latency_us_p50", "cpu-p50us", "{:.0f}"), ("cpu_latency_us_p99", "cpu-p99us", "{:.0f}"),
    ("ttft_ms_p50", "ttft-p50ms", "{:.0f}"), ("ttft_ms_p99", "ttft-p99ms", "{:.0f}"),
    ("cpu_s", "sim-cpu-s", "{:.1f}"),
]
_FAIL_COLUMNS = [("rerouted", "rerouted", "{:d}")]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    cols = _COLUMNS + (_FAIL_COLUMNS if any(r.get("failed_nodes") for r in rows) else [])
    cells = [[h for _, h, _ in cols]] + [[_cell(r.get(k), f) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """One line per check, 'PASS ...' or 'FAIL ...'. Decision latency is judged on the router
    thread's CPU time (p99), which other processes on the host cannot inflate; the wall-clock
    p99 is printed beside it."""
    out = []
    for n in sorted({r["nodes"] for r in rows}):
        by = {r["policy"]: r for r in rows if r["nodes"] == n}
        ca, rr = by.get("cache_aware"), by.get("round_robin")
        if ca and rr and n >= 2:         # one node: nothing to choose between
            ratio = ca["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] > 0 else float("inf")
            ok = ratio >= HIT_RATIO_TARGET
            out.append(f"{'PASS' if ok else 'FAIL'} {n} nodes: cache_aware hit rate {100 * ca['hit_rate']:.1f}% = "
                       f"{ratio:.2f}x round_robin's {100 * rr['hit_rate']:.1f}% (target >= {HIT_RATIO_TARGET:g}x)")
        if n >= LATENCY_TARGET_NODES:
            for p, r in by.items():
                ok = r["cpu_latency_us_p99"] < LATENCY_TARGET_US
                out.append(f"{'PASS' if ok else 'FAIL'} {n} nodes: {p} p99 decision latency "
                           f"{r['cpu_latency_us_p99']:.0f} us CPU (wall {r['latency_us_p99']:.0f} us; "
                           f"target < {LATENCY_TARGET_US:.0f} us)")
        for p, r in by.items():
            if r["index_mismatches"]:
                out.append(f"FAIL {n} nodes: {p}: the index disagreed with the workers' caches on "
                           f"{r['index_mismatches']} of {r['decisions']} decisions")
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = SimConfig()
    ap = argparse.ArgumentParser(prog="python -m pd.router.simulate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nodes", type=int, default=d.nodes, help="decode nodes")
    ap.add_argument("--prefill-nodes", type=int, default=None, help="prefill nodes (default nodes/2)")
    ap.add_argument("--policy", default="all", choices=[*POLICIES, "all"])
    ap.add_argument("--sweep", default=None, help="comma-separated decode node counts, e.g. 8,64,1024")
    ap.add_argument("--sessions", type=int, default=None, help="sessions (default sessions-per-node * nodes)")
    ap.add_argument("--sessions-per-node", type=int, default=d.sessions_per_node)
    ap.add_argument("--turns", type=int, default=d.turns)
    ap.add_argument("--rate", type=float, default=None, help="session arrivals/s (default rate-per-node * nodes)")
    ap.add_argument("--rate-per-node", type=float, default=d.rate_per_node)
    ap.add_argument("--think-time", type=float, default=d.think_time, help="mean seconds between turns")
    ap.add_argument("--system-prompts", type=int, default=d.system_prompts)
    ap.add_argument("--system-len", type=int, default=d.system_len)
    ap.add_argument("--user-len", type=int, default=d.user_len, help="mean user message tokens")
    ap.add_argument("--output-len", type=int, default=d.output_len, help="mean reply tokens")
    ap.add_argument("--len-sigma", type=float, default=d.len_sigma, help="lognormal sigma of lengths")
    ap.add_argument("--block-size", type=int, default=d.block_size)
    ap.add_argument("--kv-blocks", type=int, default=d.kv_blocks, help="KV blocks per decode node")
    ap.add_argument("--prefill-kv-blocks", type=int, default=None, help="KV blocks per prefill node")
    ap.add_argument("--max-batch", type=int, default=d.max_batch)
    ap.add_argument("--prefill-slots", type=int, default=d.prefill_slots)
    ap.add_argument("--min-remote-prefill", type=int, default=d.min_remote_prefill_tokens)
    ap.add_argument("--prefill-a", type=float, default=d.prefill_a, help="s per prefill")
    ap.add_argument("--prefill-b", type=float, default=d.prefill_b, help="s per computed prompt token")
    ap.add_argument("--decode-c", type=float, default=d.decode_c, help="s per output token")
    ap.add_argument("--decode-d", type=float, default=d.decode_d, help="s per output token per running request")
    ap.add_argument("--no-session-ids", action="store_true", help="requests carry no session key")
    ap.add_argument("--fail-nodes", type=int, default=0, help="decode nodes lost mid-run")
    ap.add_argument("--fail-at", type=float, default=None, help="s (default: when the middle session arrives)")
    ap.add_argument("--sample-every", type=int, default=d.sample_every, help="decisions between load samples")
    ap.add_argument("--imbalance-min-load", type=float, default=d.imbalance_min_load,
                    help="skip load samples whose mean NodeView.load is below this")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel processes (faster; latencies then share the cores)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    base = SimConfig(
        nodes=a.nodes, prefill_nodes=a.prefill_nodes, sessions=a.sessions,
        sessions_per_node=a.sessions_per_node, turns=a.turns, rate=a.rate, rate_per_node=a.rate_per_node,
        think_time=a.think_time, system_prompts=a.system_prompts, system_len=a.system_len,
        user_len=a.user_len, output_len=a.output_len, len_sigma=a.len_sigma, block_size=a.block_size,
        kv_blocks=a.kv_blocks, prefill_kv_blocks=a.prefill_kv_blocks, max_batch=a.max_batch,
        prefill_slots=a.prefill_slots, min_remote_prefill_tokens=a.min_remote_prefill,
        prefill_a=a.prefill_a, prefill_b=a.prefill_b, decode_c=a.decode_c, decode_d=a.decode_d,
        session_ids=not a.no_session_ids, fail_nodes=a.fail_nodes, fail_at=a.fail_at,
        sample_every=a.sample_every, imbalance_min_load=a.imbalance_min_load, seed=a.seed)
    policies = POLICY_NAMES if a.policy == "all" else [a.policy]
    try:
        sizes = [int(x) for x in a.sweep.split(",") if x.strip()] if a.sweep else [a.nodes]
        if not sizes:
            raise ValueError("--sweep needs at least one node count")
        cfgs = [replace(base, nodes=n, policy=p) for n in sizes for p in policies]
        for cfg in cfgs:
            cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run_many(cfgs, a.jobs)
    elapsed = time.perf_counter() - t0
    checks = check_targets(rows)
    if a.json:
        print(json.dumps({"config": asdict(base) | {"sweep": sizes, "policies": policies},
                          "results": rows, "checks": checks, "elapsed_s": elapsed}, indent=2))
    else:
        mode = "session ids" if base.session_ids else "no session ids (affinity from cached prefix only)"
        sess = (f"{base.sessions_per_node} sessions per decode node" if base.sessions is None
                else f"{base.sessions} sessions")
        print(f"workload: {sess}, {base.turns} turns, {base.system_prompts} system prompts x "
              f"{base.system_len} tok, user ~{base.user_len} tok, reply ~{base.output_len} tok, {mode}; "
              f"{base.kv_blocks} KV blocks x {base.block_size} tok per node; prefill nodes = "
              f"{'decode/2' if base.prefill_nodes is None else base.prefill_nodes}; seed {base.seed}"
              + (f"; {base.fail_nodes} decode nodes lost mid-run" if base.fail_nodes else ""))
        print(format_table(rows))
        for line in checks:
            print(line)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"({len(rows)} runs in {elapsed:.1f} s wall, {sum(r['cpu_s'] for r in rows):.1f} s CPU; "
              f"{os.cpu_count()} CPUs, load average {load:.1f}; lat = wall clock around policy.choose, "
              f"cpu = the router thread's CPU time for the same calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
