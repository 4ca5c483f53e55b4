"""pd-bench: drive an OpenAI-compatible server with concurrent streaming clients.

    pd-bench --base-url http://127.0.0.1:8080 --num-requests 64 --concurrency 8 --input-len 256 --output-len 128
    pd-bench --dataset multiturn --num-sessions 16 --turns 4 --send-history no --json out.json
    pd-bench --request-rate 4 --num-requests 200 --shared-prefix-len 512 --endpoint completions

Works against pdserve, vLLM, llama.cpp's server or anything that streams /v1/chat/completions
or /v1/completions. Exit status: 0 when the run completes (failed requests are reported, not
fatal), 2 for bad arguments or a server that cannot be reached at start.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time

import httpx
from tqdm import tqdm

from pd.bench.client import (ClientConfig, RequestRecord, StreamingClient, count_tokens, list_models,
                             run_requests, run_sessions, server_root)
from pd.bench.report import format_report, summarize
from pd.bench.workload import (DATASETS, DEFAULT_TOKENS_PER_WORD, WorkloadConfig, make_sessions, poisson_gaps,
                               sample_text, single_turn_requests)

DEFAULT_CONCURRENCY = 8
NUM_ERRORS_PRINTED = 3
_CALIBRATION_WORDS = 400


class StartError(Exception):
    """The benchmark cannot start (the server is unreachable or names no model)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8080", help="server root; /v1/... is appended")
    p.add_argument("--model", help="model name (default: the first id from GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--num-requests", type=int, default=64, help="requests to measure (random and fixed datasets)")
    p.add_argument("--concurrency", type=int, default=None,
                   help=f"requests (or sessions) in flight at most (default {DEFAULT_CONCURRENCY}; "
                        "unbounded with --request-rate)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default inf: all at once, limited by --concurrency)")
    p.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random: lengths drawn per request; fixed: exactly --input-len/--output-len; "
                        "multiturn: sessions of --turns sequential turns")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens per request (or per user turn)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)]")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of system text shared by every request (added to --input-len)")
    p.add_argument("--num-sessions", type=int, default=16, help="multiturn: number of conversations")
    p.add_argument("--turns", type=int, default=4, help="multiturn: user turns per conversation")
    p.add_argument("--send-history", choices=("yes", "no"), default="yes",
                   help="multiturn: send the whole conversation (yes) or only the new message + session_id (no)")
    p.add_argument("--seed", type=int, default=None, help="workload seed (default: a fresh one, stored in JSON)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos=true so every request generates --output-len tokens")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the figures")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    p.add_argument("--json", metavar="PATH", help="write all figures and the configuration here")
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def workload_from_args(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(dataset=args.dataset, num_requests=args.num_requests, input_len=args.input_len,
                          output_len=args.output_len, range_ratio=args.random_range_ratio,
                          shared_prefix_len=args.shared_prefix_len, num_sessions=args.num_sessions,
                          turns=args.turns, send_history=args.send_history == "yes", seed=args.seed)


def check_load_args(args: argparse.Namespace) -> None:
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be positive, got {args.request_rate}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    server_root(args.base_url)


async def probe_server(args: argparse.Namespace) -> tuple[str, float, str]:
    """(model, tokens per word, where that ratio came from); raises StartError."""
    root = server_root(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=min(args.timeout, 10.0)) as http:
        try:
            models = await list_models(http, root)
        except (httpx.HTTPError, ValueError) as exc:
            raise StartError(f"cannot reach {root}/v1/models ({type(exc).__name__}: {exc}); "
                             "start the server or fix --base-url") from exc
        model = args.model or (models[0] if models else None)
        if model is None:
            raise StartError(f"GET {root}/v1/models listed no model; pass --model")
        num_tokens = await count_tokens(http, root, model, sample_text(_CALIBRATION_WORDS, args.seed))
    if num_tokens:
        return model, num_tokens / _CALIBRATION_WORDS, "tokenize"
    return model, DEFAULT_TOKENS_PER_WORD, "default"


class Progress:
    """Progress bar on stderr, plus the first few failures as they happen."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr, disable=not enabled)
        self.num_printed = 0

    def __call__(self, record: RequestRecord) -> None:
        self.bar.update(1)
        if record.error and self.num_printed < NUM_ERRORS_PRINTED:
            self.num_printed += 1
            tqdm.write(f"request {record.index} failed: {record.error}", file=sys.stderr)


async def run(args: argparse.Namespace, workload: WorkloadConfig) -> int:
    model, tokens_per_word, calibration = await probe_server(args)
    config = ClientConfig(base_url=args.base_url, model=model, endpoint=args.endpoint, api_key=args.api_key,
                          timeout_s=args.timeout, ignore_eos=args.ignore_eos)
    is_multiturn = workload.dataset == "multiturn"
    num_arrivals = workload.num_sessions if is_multiturn else workload.num_requests
    unbounded = args.request_rate != float("inf")
    concurrency = args.concurrency or (max(num_arrivals, args.warmup) if unbounded else DEFAULT_CONCURRENCY)
    print(f"pd-bench: {config.url} model={model} dataset={workload.dataset} seed={workload.seed} "
          f"concurrency={concurrency} tokens/word={tokens_per_word:.3f} ({calibration})", file=sys.stderr)

    async with StreamingClient(config, max_connections=concurrency) as client:
        if args.warmup:
            warmup = single_turn_requests(workload, tokens_per_word, args.warmup,
                                          first_index=workload.num_measured, stream="warmup")
            await run_requests(client, warmup, concurrency, [0.0] * len(warmup), lambda r: None, is_warmup=True)
        progress = Progress(workload.num_measured, enabled=not args.no_progress)
        gaps = poisson_gaps(args.request_rate, num_arrivals, workload.seed)
        start = time.perf_counter()
        if is_multiturn:
            records = await run_sessions(client, make_sessions(workload, tokens_per_word), concurrency, gaps, progress)
        else:
            requests = single_turn_requests(workload, tokens_per_word, workload.num_requests)
            records = await run_requests(client, requests, concurrency, gaps, progress)
        duration = time.perf_counter() - start
        progress.bar.close()

    summary = summarize(records, duration)
    header = [("model", model), ("endpoint", config.url), ("dataset", workload.dataset),
              ("concurrency", concurrency), ("request rate (req/s)", args.request_rate)]
    print(format_report(summary, header + ([("label", args.label)] if args.label else [])))
    if args.json:
        _write_json(args, workload, model, concurrency, tokens_per_word, calibration, summary)
    return 0


def _write_json(args: argparse.Namespace, workload: WorkloadConfig, model: str, concurrency: int,
                tokens_per_word: float, calibration: str, summary: dict) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "json", "no_progress")}
    config.update(model=model, seed=workload.seed, concurrency=concurrency, tokens_per_word=tokens_per_word,
                  tokens_per_word_source=calibration, request_rate=_finite_or_str(args.request_rate))
    document = {"label": args.label, "started_at": datetime.datetime.now().astimezone().isoformat(),
                "config": config, "results": summary}
    with open(args.json, "w") as f:
        json.dump(document, f, indent=2)
    print(f"pd-bench: wrote {args.json}", file=sys.stderr)


def _finite_or_str(value: float) -> float | str:
    return value if value != float("inf") else "inf"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    try:
        check_load_args(args)
        workload = workload_from_args(args)
    except ValueError as exc:
        print(f"pd-bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, workload))
    except StartError as exc:
        print(f"pd-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pd-bench: interrupted; no report", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
