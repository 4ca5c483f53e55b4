"""Router residency index and routing policies (pd/router/index.py, pd/router/policy.py)."""
from __future__ import annotations

import pytest

from engine.kv_cache.prefix_hash import chain_hashes
from pd.router.index import ResidencyIndex
from pd.router.policy import CacheAware, LeastLoad, NodeView, RoundRobin, RouteRequest, make_policy

BS = 16


def dnode(i: int, **kw) -> NodeView:
    kw.setdefault("num_free_blocks", 100)
    kw.setdefault("num_blocks", 100)
    return NodeView(f"d{i}", "decode", f"http://d{i}", **kw)


def pnode(i: int, **kw) -> NodeView:
    kw.setdefault("num_free_blocks", 100)
    kw.setdefault("num_blocks", 100)
    return NodeView(f"p{i}", "prefill", f"grpc://p{i}", **kw)


def request(num_blocks: int = 16, extra_tokens: int = 0, session: str | None = None,
            seed: int = 1) -> RouteRequest:
    """A request whose prompt has `num_blocks` full blocks (real chained hashes) plus a tail."""
    tokens = [(seed * 7919 + i) % 50_000 for i in range(num_blocks * BS + extra_tokens)]
    return RouteRequest(chain_hashes(tokens, BS), len(tokens), BS, session)


# ---- ResidencyIndex ------------------------------------------------------------------------

class TestIndexMatch:
    def test_counts_leading_blocks_per_node(self):
        ix = ResidencyIndex()
        h = request(6).block_hashes
        ix.stored("a", h[:6])
        ix.stored("b", h[:2])
        ix.stored("c", h[:4])
        assert ix.match(h) == {"a": 6, "b": 2, "c": 4}

    def test_a_gap_stops_the_match(self):
        ix = ResidencyIndex()
        h = request(6).block_hashes
        ix.stored("a", [h[0], h[1], h[3], h[4], h[5]])      # block 2 missing
        assert ix.match(h) == {"a": 2}

    def test_gaps_are_per_node(self):
        ix = ResidencyIndex()
        h = request(5).block_hashes
        ix.stored("a", [h[0], h[2], h[3], h[4]])            # a lacks block 1
        ix.stored("b", [h[1], h[2], h[3], h[4]])            # b lacks block 0
        assert ix.match(h) == {"a": 1}

    def test_first_block_unknown_matches_nothing(self):
        ix = ResidencyIndex()
        h = request(4).block_hashes
        ix.stored("a", h[1:])
        assert ix.match(h) == {}
        assert ix.match([]) == {}

    def test_other_prefixes_do_not_match(self):
        ix = ResidencyIndex()
        ix.stored("a", request(4, seed=1).block_hashes)
        assert ix.match(request(4, seed=2).block_hashes) == {}

    def test_nodes_filter(self):
        ix = ResidencyIndex()
        h = request(4).block_hashes
        ix.stored("a", h)
        ix.stored("b", h[:3])
        assert ix.match(h, ["b"]) == {"b": 3}
        assert ix.match(h, ["b", "zz"]) == {"b": 3}
        assert ix.match(h, []) == {}
        assert ix.match(h, ["zz"]) == {}

    def test_stored_twice_is_idempotent(self):
        ix = ResidencyIndex()
        h = request(3).block_hashes
        ix.stored("a", h)
        ix.stored("a", h)
        assert ix.match(h) == {"a": 3}
        assert ix.num_entries == 3


class TestIndexUpdates:
    def test_removed_truncates_the_match(self):
        ix = ResidencyIndex()
        h = request(6).block_hashes
        ix.stored("a", h)
        ix.stored("b", h)
        ix.removed("a", [h[3]])
        assert ix.match(h) == {"a": 3, "b": 6}
        assert ix.node_blocks("a") == set(h) - {h[3]}
        ix.removed("b", h)
        assert ix.match(h) == {"a": 3}
        assert ix.node_blocks("b") == set()
        assert ix.num_entries == 5

    def test_removed_of_unknown_node_or_block_is_harmless(self):
        ix = ResidencyIndex()
        h = request(2).block_hashes
        ix.stored("a", h)
        ix.removed("zz", h)
        ix.removed("a", [12345])
        assert ix.match(h) == {"a": 2}

    def test_node_blocks_is_a_copy(self):
        ix = ResidencyIndex()
        h = request(2).block_hashes
        ix.stored("a", h)
        ix.node_blocks("a").clear()
        assert ix.match(h) == {"a": 2}

    def test_purge_forgets_the_node_blocks_and_sessions(self):
        ix = ResidencyIndex()
        h = request(3).block_hashes
        ix.stored("a", h)
        ix.stored("b", h[:1])
        ix.session_resident("a", "s1")
        ix.session_resident("b", "s2")
        ix.purge("a")
        assert ix.node_blocks("a") == set()
        assert ix.node_sessions("a") == set()
        assert ix.session_node("s1") is None
        assert ix.session_node("s2") == "b"
        assert ix.num_entries == 1
        ix.purge("never-seen")          # harmless

    def test_purge_removes_the_node_from_match(self):
        # (was a strict xfail: purge() popped the node's blocks before removed() could drop
        # it from the holders, so match() kept reporting a purged node; fixed in index.py)
        ix = ResidencyIndex()
        h = request(3).block_hashes
        ix.stored("a", h)
        ix.stored("b", h[:1])
        ix.purge("a")
        assert ix.match(h) == {"b": 1}
        assert ix.match(h, ["a"]) == {}
        ix.stored("a", h[:2])            # the node comes back empty and fills again
        assert ix.match(h) == {"a": 2, "b": 1}

    def test_replace_sets_the_node_state(self):
        ix = ResidencyIndex()
        h = request(4).block_hashes
        ix.stored("a", h)
        ix.session_resident("a", "old")
        ix.replace("a", h[:2], ["new"])
        assert ix.node_blocks("a") == set(h[:2])
        assert ix.node_sessions("a") == {"new"}
        assert ix.session_node("new") == "a"
        assert ix.session_node("old") is None
        assert ix.num_entries == 2

    def test_replace_forgets_blocks_the_node_no_longer_has(self):
        ix = ResidencyIndex()
        h = request(4).block_hashes
        ix.stored("a", h)
        ix.replace("a", h[:2], [])
        assert ix.match(h) == {"a": 2}


class TestIndexSessions:
    def test_resident_then_evicted(self):
        ix = ResidencyIndex()
        ix.session_resident("a", "s")
        assert ix.session_node("s") == "a"
        assert ix.node_sessions("a") == {"s"}
        ix.session_evicted("a", "s")
        assert ix.session_node("s") is None
        assert ix.node_sessions("a") == set()

    def test_moving_node_and_a_late_eviction_from_the_old_node(self):
        ix = ResidencyIndex()
        ix.session_resident("a", "s")
        ix.session_resident("b", "s")
        assert ix.session_node("s") == "b"
        assert ix.node_sessions("a") == set()
        ix.session_evicted("a", "s")        # the old node drops its stale copy later
        assert ix.session_node("s") == "b"
        ix.session_evicted("b", "s")
        assert ix.session_node("s") is None

    def test_unknown_session(self):
        ix = ResidencyIndex()
        assert ix.session_node("nope") is None
        ix.session_evicted("a", "nope")     # harmless
        assert ix.session_node("nope") is None


# ---- policies ------------------------------------------------------------------------------

class TestNodeLoad:
    def test_load_formula(self):
        n = dnode(0, num_running=3, num_waiting=2, inflight=1, num_free_blocks=25, num_blocks=100)
        assert n.load == pytest.approx(3 + 2 * 2 + 1 + 4 * 0.75)


class TestRoundRobin:
    def test_cycles_decode_and_prefill_nodes(self):
        pol = RoundRobin(min_remote_prefill_tokens=1)
        decodes = [dnode(i) for i in range(3)]
        prefills = [pnode(i) for i in range(2)]
        ix = ResidencyIndex()
        picks = [pol.choose(request(4), decodes, prefills, ix) for _ in range(7)]
        assert [d.decode.node_id for d in picks] == ["d0", "d1", "d2", "d0", "d1", "d2", "d0"]
        assert [d.prefill.node_id for d in picks] == ["p0", "p1", "p0", "p1", "p0", "p1", "p0"]

    def test_ignores_load_and_cache_but_reports_cached_tokens(self):
        pol = RoundRobin()
        decodes = [dnode(0, num_running=50), dnode(1)]
        ix = ResidencyIndex()
        req = request(10)
        ix.stored("d0", req.block_hashes[:4])
        d = pol.choose(req, decodes, [], ix)
        assert d.decode.node_id == "d0" and d.cached_tokens == 4 * BS and d.prefill is None

    def test_no_prefill_node_below_min_remote_prefill(self):
        pol = RoundRobin(min_remote_prefill_tokens=128)
        d = pol.choose(request(7, extra_tokens=15), [dnode(0)], [pnode(0)], ResidencyIndex())
        assert d.prefill is None                          # 127 uncached tokens
        d = pol.choose(request(8), [dnode(0)], [pnode(0)], ResidencyIndex())
        assert d.prefill is not None                      # 128


class TestLeastLoad:
    def test_picks_the_least_loaded_decode_and_prefill_nodes(self):
        pol = LeastLoad(min_remote_prefill_tokens=1)
        decodes = [dnode(0, num_running=3), dnode(1, num_waiting=1), dnode(2, inflight=1)]
        prefills = [pnode(0, num_running=1), pnode(1)]
        d = pol.choose(request(4), decodes, prefills, ResidencyIndex())
        assert d.decode.node_id == "d2"                   # loads 3, 2 (waiting counts double), 1
        decodes[2].inflight = 3
        d = pol.choose(request(4), decodes, prefills, ResidencyIndex())
        assert d.decode.node_id == "d1"
        assert d.prefill.node_id == "p1"

    def test_counts_kv_pressure(self):
        pol = LeastLoad()
        decodes = [dnode(0, num_free_blocks=10), dnode(1, num_free_blocks=90)]
        assert pol.choose(request(1), decodes, [], ResidencyIndex()).decode.node_id == "d1"

    def test_ties_go_to_the_first_node(self):
        pol = LeastLoad()
        decodes = [dnode(i) for i in range(4)]
        assert pol.choose(request(1), decodes, [], ResidencyIndex()).decode.node_id == "d0"


class TestCacheAware:
    def test_session_affinity_wins_when_the_node_is_healthy(self):
        pol = CacheAware()
        ix = ResidencyIndex()
        req = request(16, session="s1")
        decodes = [dnode(0, num_running=20), dnode(1)]
        ix.session_resident("d0", "s1")
        ix.stored("d0", req.block_hashes[:8])
        ix.stored("d1", req.block_hashes)                 # longer prefix and idle: still d0
        d = pol.choose(req, decodes, [], ix)
        assert d.decode.node_id == "d0"
        assert d.reason == "session affinity"
        assert d.cached_tokens == 8 * BS

    def test_falls_back_when_the_session_node_is_unhealthy(self):
        pol = CacheAware()
        ix = ResidencyIndex()
        req = request(16, session="s1")
        decodes = [dnode(0, healthy=False, num_running=5), dnode(1), dnode(2)]
        ix.session_resident("d0", "s1")
        ix.stored("d2", req.block_hashes[:10])
        d = pol.choose(req, decodes, [], ix)
        assert d.decode.node_id == "d2"
        assert d.reason == "cached prefix"
        assert d.cached_tokens == 10 * BS

    def test_falls_back_when_the_session_node_is_absent(self):
        pol = CacheAware()
        ix = ResidencyIndex()
        req = request(16, session="s1")
        ix.session_resident("gone", "s1")
        decodes = [dnode(0, num_running=2), dnode(1)]
        d = pol.choose(req, decodes, [], ix)
        assert d.decode.node_id == "d1"
        assert d.reason == "least load"
        assert d.cached_tokens == 0

    def test_unknown_session_uses_prefix_then_load(self):
        pol = CacheAware()
        ix = ResidencyIndex()
        req = request(16, session="new")
        ix.stored("d1", req.block_hashes[:12])
        d = pol.choose(req, [dnode(0), dnode(1)], [], ix)
        assert d.decode.node_id == "d1" and d.reason == "cached prefix"

    def test_longest_cached_prefix_wins_at_equal_load(self):
        pol = CacheAware()
        ix = ResidencyIndex()
        req = request(16)
        decodes = [dnode(i, num_running=2) for i in range(4)]
        ix.stored("d0", req.block_hashes[:4])
        ix.stored("d1", req.block_hashes[:12])
        ix.stored("d3", req.block_hashes[:8])
        d = pol.choose(req, decodes, [], ix)
        assert d.decode.node_id == "d1"
        assert d.cached_tokens == 12 * BS
        assert set(d.scores) == {"d1"}  # the chosen node's score (logged at debug)

    def test_cache_beats_a_small_load_gap(self):
        pol = CacheAware(max_imbalance=8.0)
        ix = ResidencyIndex()
        req = request(16)
        ix.stored("d0", req.block_hashes)
        d = pol.choose(req, [dnode(0, num_running=6), dnode(1)], [], ix)
        assert d.decode.node_id == "d0"

    def test_a_much_less_loaded_node_wins_beyond_max_imbalance(self):
        pol = CacheAware(max_imbalance=8.0)
        ix = ResidencyIndex()
        req = request(16)
        ix.stored("d0", req.block_hashes)
        d = pol.choose(req, [dnode(0, num_running=10), dnode(1)], [], ix)
        assert d.decode.node_id == "d1"
        assert d.reason == "least load"
        assert d.cached_tokens == 0

    def test_no_prefill_node_when_the_uncached_suffix_is_short(self):
        pol = CacheAware(min_remote_prefill_tokens=128)
        ix = ResidencyIndex()
        prefills = [pnode(0), pnode(1)]
        req = request(20, extra_tokens=5)                   # 325 tokens
        ix.stored("d0", req.block_hashes[:13])              # 208 cached: 117 uncached < 128
        d = pol.choose(req, [dnode(0)], prefills, ix)
        assert d.decode.node_id == "d0" and d.prefill is None
        ix.removed("d0", req.block_hashes[12:])             # 192 cached: 133 uncached >= 128
        d = pol.choose(req, [dnode(0)], prefills, ix)
        assert d.prefill is not None

    def test_no_prefill_node_without_prefill_nodes(self):
        d = CacheAware(min_remote_prefill_tokens=1).choose(request(16), [dnode(0)], [], ResidencyIndex())
        assert d.prefill is None

    def test_prefill_node_with_the_longest_prefix(self):
        pol = CacheAware(min_remote_prefill_tokens=16)
        ix = ResidencyIndex()
        req = request(16, session="s")
        ix.session_resident("d0", "s")
        ix.stored("p1", req.block_hashes[:14])
        ix.stored("p2", req.block_hashes[:6])
        prefills = [pnode(0), pnode(1, num_running=1), pnode(2)]
        d = pol.choose(req, [dnode(0), dnode(1)], prefills, ix)
        assert d.decode.node_id == "d0" and d.prefill.node_id == "p1"

    def test_prefill_node_by_load_without_cache(self):
        pol = CacheAware(min_remote_prefill_tokens=16)
        prefills = [pnode(0, num_running=2), pnode(1, num_waiting=3), pnode(2, num_running=1)]
        d = pol.choose(request(16), [dnode(0)], prefills, ResidencyIndex())
        assert d.prefill.node_id == "p2"


def test_cache_aware_routes_among_the_nodes_it_is_given():
    """pd-router hands the policy the usable nodes only (Registry.usable); a node left out is
    never chosen, whatever it holds, and its session falls back to the cached prefix."""
    pol = CacheAware(min_remote_prefill_tokens=1)
    ix = ResidencyIndex()
    req = request(16, session="s")
    ix.session_resident("d0", "s")
    ix.stored("d0", req.block_hashes)
    ix.stored("p0", req.block_hashes)
    ix.stored("d2", req.block_hashes[:5])
    d = pol.choose(req, [dnode(1), dnode(2)], [pnode(1)], ix)
    assert d.decode.node_id == "d2" and d.prefill.node_id == "p1"
    assert d.cached_tokens == 5 * BS


def test_make_policy():
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_load"), LeastLoad)
    pol = make_policy("cache_aware", min_remote_prefill_tokens=64)
    assert isinstance(pol, CacheAware) and pol.min_remote_prefill_tokens == 64


def test_make_policy_error_lists_the_choices():
    with pytest.raises(ValueError) as e:
        make_policy("random")
    msg = str(e.value)
    assert "'random'" in msg
    for name in ("round_robin", "least_load", "cache_aware"):
        assert name in msg
