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
import json
import os
import sys
import time
from dataclasses import asdict, replace

from pd.router.policy import POLICIES
from pd.router.sim_model import SimConfig, Workload  # noqa: F401  (re-exported)
from pd.router.sim_report import check_targets, format_table

from pd.router.sim_run import POLICY_NAMES, Simulation, compare, run_many, simulate  # noqa: F401

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
