"""Aggregation of request records into throughput and latency figures, as a table or JSON."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from pd.bench.client import RequestRecord

NUM_ERRORS_SHOWN = 5


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> Stats | None:
        if not values:
            return None
        scaled = [v * scale for v in values]
        return cls(count=len(scaled), mean=sum(scaled) / len(scaled), p50=percentile(scaled, 50),
                   p90=percentile(scaled, 90), p99=percentile(scaled, 99))


def _stats_dict(values: list[float], scale: float = 1.0) -> dict | None:
    stats = Stats.of(values, scale)
    return asdict(stats) if stats else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """All figures of a run; latencies in ms, throughputs per second of `duration_s`."""
    ok = [r for r in records if r.is_success]
    input_tokens = sum(r.num_prompt_tokens for r in ok)
    output_tokens = sum(r.num_output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    summary = {
        "num_requests": len(records),
        "successful": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else 0.0,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "mean_input_tokens": _mean([r.num_prompt_tokens for r in ok]),
        "mean_output_tokens": _mean([r.num_output_tokens for r in ok]),
        "mean_cached_tokens": _mean(cached),
        "requests_without_usage": sum(r.completion_tokens is None for r in ok),
        "ttft_ms": _stats_dict([r.ttft for r in ok if r.ttft is not None], 1000.0),
        "tpot_ms": _stats_dict([r.tpot for r in ok if r.tpot is not None], 1000.0),
        "itl_ms": _stats_dict([gap for r in ok for gap in r.itls], 1000.0),
        "e2e_ms": _stats_dict([r.e2e for r in ok], 1000.0),
        "errors": [{"message": m, "count": n}
                   for m, n in Counter(r.error for r in records if r.error).most_common(NUM_ERRORS_SHOWN)],
    }
    if any(r.turn is not None for r in records):
        summary.update(_by_turn(ok))
    return summary


def _by_turn(ok: list[RequestRecord]) -> dict:
    turns = sorted({r.turn for r in ok if r.turn is not None})
    by_turn = {}
    for turn in turns:
        rows = [r for r in ok if r.turn == turn]
        by_turn[str(turn)] = {
            "successful": len(rows),
            "ttft_ms": _stats_dict([r.ttft for r in rows if r.ttft is not None], 1000.0),
            "mean_input_tokens": _mean([r.num_prompt_tokens for r in rows]),
            "mean_cached_tokens": _mean([r.cached_tokens for r in rows if r.cached_tokens is not None]),
        }
    return {
        "ttft_first_turn_ms": _stats_dict([r.ttft for r in ok if r.turn == 1 and r.ttft is not None], 1000.0),
        "ttft_later_turns_ms": _stats_dict([r.ttft for r in ok if (r.turn or 0) > 1 and r.ttft is not None],
                                           1000.0),
        "by_turn": by_turn,
    }


# ---- table ---------------------------------------------------------------------------------------
def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


_NAME_WIDTH = 28


def _rows(pairs: list[tuple[str, object]], align: str = ">") -> list[str]:
    return [f"{name:<{_NAME_WIDTH}}{_fmt(value):{align}14}".rstrip() for name, value in pairs]


def _latency_rows(named: list[tuple[str, dict | None]]) -> list[str]:
    lines = [f"{'latency (ms)':<{_NAME_WIDTH - 14}}" + "".join(f"{h:>14}" for h in ("mean", "p50", "p90", "p99"))]
    for name, stats in named:
        cells = [_fmt(stats[k] if stats else None) for k in ("mean", "p50", "p90", "p99")]
        lines.append(f"{name:<{_NAME_WIDTH - 14}}" + "".join(f"{c:>14}" for c in cells))
    return lines


def format_report(summary: dict, header: list[tuple[str, object]]) -> str:
    """An aligned plain-text table: `header` rows (model, endpoint, ...), counts, throughput, latency."""
    lines = _rows(header, align="<") + [""] + _rows([
        ("successful requests", summary["successful"]),
        ("failed requests", summary["failed"]),
        ("duration (s)", summary["duration_s"]),
        ("request throughput (req/s)", summary["request_throughput"]),
        ("output throughput (tok/s)", summary["output_throughput"]),
        ("total throughput (tok/s)", summary["total_token_throughput"]),
        ("mean input tokens", summary["mean_input_tokens"]),
        ("mean output tokens", summary["mean_output_tokens"]),
        ("mean cached tokens", summary["mean_cached_tokens"]),
    ])
    latency = [("TTFT", summary["ttft_ms"]), ("TPOT", summary["tpot_ms"]), ("ITL", summary["itl_ms"]),
               ("E2E", summary["e2e_ms"])]
    if "by_turn" in summary:
        latency += [("TTFT turn 1", summary["ttft_first_turn_ms"]),
                    ("TTFT turns 2+", summary["ttft_later_turns_ms"])]
    lines += [""] + _latency_rows(latency)
    if "by_turn" in summary:
        lines += [""] + _turn_rows(summary["by_turn"])
    rule = "=" * max(len(line) for line in lines)
    if summary["requests_without_usage"]:
        lines += ["", f"{summary['requests_without_usage']} requests had no usage chunk: "
                      "their tokens are counted as chunks (output) and estimated (input)"]
    if summary["errors"]:
        lines += ["", "errors (most frequent first):"]
        lines += [f"  {e['count']:>5} x {e['message']}" for e in summary["errors"]]
    return "\n".join([rule, *lines, rule])


def _turn_rows(by_turn: dict) -> list[str]:
    heads = ("ok", "TTFT mean", "TTFT p50", "input tok", "cached tok")
    lines = [f"{'turn':>4}" + "".join(f"{h:>12}" for h in heads)]
    for turn, row in by_turn.items():
        ttft = row["ttft_ms"] or {}
        cells = [_fmt(row["successful"]), _fmt(ttft.get("mean")), _fmt(ttft.get("p50")),
                 _fmt(row["mean_input_tokens"], 1), _fmt(row["mean_cached_tokens"], 1)]
        lines.append(f"{turn:>4}" + "".join(f"{c:>12}" for c in cells))
    return lines
