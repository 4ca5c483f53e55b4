"""pd-decode: the OpenAI-compatible decode node (colocated without --pd-url)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from engine.args import add_engine_args, builder_from_args, setup_logging
from pd.decode.app import DEFAULT_MAX_BODY_BYTES, create_app
from pd.decode.metrics import ServingMetrics
from pd.decode.state import NodeState
from pd.serve import serve_app

logger = logging.getLogger("pd.decode")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-decode", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: derived)")
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; also PDSERVE_API_KEY); none = no auth")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="queued requests beyond which new ones get 429 (default 4 x max-num-seqs)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight work")
    add_engine_args(p)
    return p


def default_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.hub_id:
        return args.hub_id
    path = args.weights_dir or args.gguf_file
    if path:
        return os.path.basename(os.path.normpath(path))
    return "SmolLM2-135M-Instruct"


def build_state(args: argparse.Namespace, connector=None, role: str = "decode") -> NodeState:
    from engine.async_engine import AsyncEngine
    builder = builder_from_args(args)
    if connector is not None:
        builder.connector(connector)
    llm = builder.build_llm_engine()
    engine = AsyncEngine(llm).start()
    name = default_model_name(args)
    metrics = ServingMetrics(name, llm.stats, lambda: _session_metrics(llm))
    keys = frozenset(args.api_key or ([os.environ["PDSERVE_API_KEY"]] if os.environ.get("PDSERVE_API_KEY") else []))
    return NodeState(engine=engine, tokenizer=llm.tokenizer, model_name=name, max_model_len=llm.max_model_len,
                     metrics=metrics, api_keys=keys, max_waiting=args.max_waiting or 4 * args.max_num_seqs,
                     role=role)


def _session_metrics(llm) -> dict:
    sessions = llm.scheduler.sessions
    return {"pdserve:sessions_resident": (len(sessions.sessions), "gauge", "Sessions with resident KV"),
            "pdserve:session_evictions": (sessions.num_evicted, "counter", "Sessions evicted under KV pressure")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        state = build_state(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pd-decode: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(state, args.max_request_bytes)
    return asyncio.run(serve_app(app, state, args.host, args.port, args.drain_timeout, "pd-decode",
                                 args.log_level))


if __name__ == "__main__":
    sys.exit(main())
