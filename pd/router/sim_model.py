"""The simulated cluster: configuration, workload generator and simulated workers."""
from __future__ import annotations

import math
import random
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from engine.kv_cache.prefix_hash import chain_hashes
from pd.router.index import ResidencyIndex
from pd.router.policy import POLICIES, NodeView


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


