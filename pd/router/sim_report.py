"""Tables and target checks for simulator results."""
from __future__ import annotations

import math

HIT_RATIO_TARGET = 2.0          # cache_aware hit rate >= 2x round_robin's
LATENCY_TARGET_US = 1000.0      # p99 decision latency at 1,024 nodes
LATENCY_TARGET_NODES = 1024

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


