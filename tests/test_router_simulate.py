"""The router cluster simulator (pd/router/simulate.py) on small clusters: it drives the real
policies and index, so these are also end-to-end checks of the routing code."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from pd.router.simulate import SimConfig, Simulation, Workload, check_targets, compare, main, simulate

# 8 decode + 4 prefill nodes, 24 sessions of 5 turns sharing 4 system prompts.
SMALL = SimConfig(nodes=8, sessions=24, turns=5, system_prompts=4, system_len=256)
TIMING_KEYS = {"latency_us_p50", "latency_us_p99", "latency_us_max", "cpu_latency_us_p50",
               "cpu_latency_us_p99", "wall_s", "cpu_s"}


def strip_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def small_rows() -> dict[str, dict]:
    return {r["policy"]: r for r in compare(SMALL, ["round_robin", "least_load", "cache_aware"])}


def test_every_turn_is_served(small_rows):
    for r in small_rows.values():
        assert r["requests"] == SMALL.num_sessions * SMALL.turns
        assert r["decisions"] == r["requests"]
        assert r["index_mismatches"] == 0, "the index disagreed with the simulated workers' caches"
        assert r["kv_overflow_blocks"] == 0


def test_cache_aware_doubles_round_robin_hit_rate(small_rows):
    ca, rr = small_rows["cache_aware"], small_rows["round_robin"]
    assert ca["hit_rate"] >= 2 * rr["hit_rate"], (ca["hit_rate"], rr["hit_rate"])
    assert ca["hit_rate"] > 0.7
    assert ca["affinity_frac"] > 0.5                     # turns after the first follow their session
    assert rr["affinity_frac"] == 0
    checks = check_targets(list(small_rows.values()))
    assert any(line.startswith("PASS 8 nodes: cache_aware hit rate") for line in checks)


def test_metrics_are_present(small_rows):
    for r in small_rows.values():
        for key in ("latency_us_p50", "latency_us_p99", "cpu_latency_us_p50", "cpu_latency_us_p99",
                    "imbalance_p50", "imbalance_p99", "load_cv", "ttft_ms_p50", "ttft_ms_p99"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, key
        assert 0 < r["latency_us_p50"] <= r["latency_us_p99"] <= r["latency_us_max"]
        assert 1.0 <= r["imbalance_p50"] <= r["imbalance_p99"]
        assert 0 <= r["hit_rate"] <= 1 and 0 <= r["prefill_hit_rate"] <= 1
        assert 0 < r["remote_prefill_frac"] <= 1
        assert r["output_tok_per_s"] > 0


def test_cache_aware_prefills_less_remotely(small_rows):
    # a routed follow-up turn finds all but its new message cached, below the remote threshold
    assert small_rows["cache_aware"]["remote_prefill_frac"] < small_rows["round_robin"]["remote_prefill_frac"]


def test_without_session_ids_affinity_comes_from_the_cached_prefix():
    rows = {r["policy"]: r for r in compare(replace(SMALL, session_ids=False), ["round_robin", "cache_aware"])}
    ca, rr = rows["cache_aware"], rows["round_robin"]
    assert ca["affinity_frac"] == 0 and ca["session_evictions"] == 0
    assert ca["hit_rate"] >= 2 * rr["hit_rate"], (ca["hit_rate"], rr["hit_rate"])
    assert ca["index_mismatches"] == 0


def test_deterministic_by_seed():
    a = strip_timing(simulate(SMALL))
    b = strip_timing(simulate(SMALL))
    c = strip_timing(simulate(replace(SMALL, seed=1)))
    assert a == b
    assert a != c


def test_workload_is_identical_across_policies():
    w1, w2 = Workload(replace(SMALL, policy="round_robin")), Workload(replace(SMALL, policy="cache_aware"))
    assert w1.sessions == w2.sessions and w1.system_hashes == w2.system_hashes
    assert len(w1.sessions) == 24 and all(len(s.user_lens) == 5 for s in w1.sessions)


def test_deterministic_across_processes_and_hash_seeds():
    """Set iteration order (string hashing) must not leak into routing decisions."""
    args = [sys.executable, "-m", "pd.router.simulate", "--nodes", "8", "--sessions", "16", "--turns", "4",
            "--policy", "cache_aware", "--json"]
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append([strip_timing(r) for r in json.loads(p.stdout)["results"]])
    assert outs[0] == outs[1]


def test_kv_pressure_keeps_the_index_consistent():
    """Tiny KV pools: blocks and sessions are evicted all the time, and every removal reaches the index."""
    cfg = replace(SMALL, kv_blocks=160, prefill_kv_blocks=120)
    for policy in ("round_robin", "cache_aware"):
        sim = Simulation(replace(cfg, policy=policy))
        r = sim.run()
        assert r["requests"] == cfg.num_sessions * cfg.turns
        assert r["block_evictions"] > 0
        assert r["index_mismatches"] == 0
        for node in sim.nodes.values():
            held = set(node.pinned) | set(node.free_lru)
            assert len(held) <= node.capacity
            assert sim.index.node_blocks(node.node_id) == held
        if policy == "cache_aware":
            assert r["session_evictions"] > 0
            for node in sim.nodes.values():       # every session the index places is resident there
                for key in sim.index.node_sessions(node.node_id):
                    assert key in node.sessions


def test_node_loss_loses_no_turn():
    for policy in ("round_robin", "least_load", "cache_aware"):
        sim = Simulation(replace(SMALL, policy=policy, fail_nodes=2))
        r = sim.run()
        assert r["failed_nodes"] == 2
        assert r["rerouted"] > 0
        assert r["requests"] == SMALL.num_sessions * SMALL.turns
        assert r["index_mismatches"] == 0
        for nid in sim.failed_nodes:             # purged: the index forgets the lost nodes
            assert sim.index.node_blocks(nid) == set() and sim.index.node_sessions(nid) == set()
            assert nid not in sim.index.match(sim.wl.system_hashes[0])


def test_cli_table_and_checks(capsys):
    assert main(["--nodes", "4", "--sessions", "8", "--turns", "3"]) == 0
    out = capsys.readouterr().out
    for word in ("round_robin", "least_load", "cache_aware", "hit%", "lat-p99us", "cpu-p99us", "imb-p99"):
        assert word in out
    assert "4 nodes: cache_aware hit rate" in out


def test_cli_sweep_json(capsys):
    assert main(["--sweep", "2,4", "--sessions", "6", "--turns", "2", "--policy", "cache_aware", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["nodes"], r["policy"]) for r in data["results"]] == [(2, "cache_aware"), (4, "cache_aware")]
    assert data["results"][0]["prefill_nodes"] == 1 and data["results"][1]["prefill_nodes"] == 2


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--nodes", "0"]) == 2
    assert main(["--sweep", ","]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--policy", "random"])


def test_latency_target_is_checked_at_1024_nodes():
    row = {"nodes": 1024, "policy": "cache_aware", "hit_rate": 0.9, "cpu_latency_us_p99": 1500.0,
           "latency_us_p99": 2000.0, "index_mismatches": 0, "decisions": 1}
    assert check_targets([row]) == [
        "FAIL 1024 nodes: cache_aware p99 decision latency 1500 us CPU (wall 2000 us; target < 1000 us)"]
    row["cpu_latency_us_p99"] = 400.0
    assert check_targets([row])[0].startswith("PASS")
