"""The discrete-event simulation: routing decisions, worker events, metrics."""
from __future__ import annotations

import heapq
import math
import random
import statistics
import time
from dataclasses import replace

from engine.kv_cache.prefix_hash import chain_hashes
from pd.router.index import ResidencyIndex
from pd.router.policy import POLICIES, NodeView, RouteRequest, make_policy
from pd.router.sim_model import SimConfig, SimNode, Workload, _Request, _Session
perf_counter = time.perf_counter
thread_time = time.thread_time


_TURN, _PREFILL_DONE, _DECODE_ARRIVE, _DECODE_DONE, _FAIL = range(5)
POLICY_NAMES = list(POLICIES)


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


