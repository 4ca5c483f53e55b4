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
    p.add_argument("--no-session-cache", action="store_true",
                   help="don't keep sessions' KV resident between turns (history is still kept)")
    pd = p.add_argument_group("prefill/decode disaggregation")
    pd.add_argument("--pd-url", action="append", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                    help="prefill node(s); without it the node serves colocated")
    pd.add_argument("--pd-transport", default="auto", choices=["auto", "grpc", "local"],
                    help="auto: shared memory when the prefill node is on this host, gRPC otherwise")
    pd.add_argument("--pd-failure", default="recompute", choices=["recompute", "fail"],
                    help="on a failed remote prefill: prefill locally, or fail the request")
    pd.add_argument("--pd-min-prompt-tokens", type=int, default=128,
                    help="uncached prompt suffixes shorter than this are prefilled locally")
    pd.add_argument("--pd-connect-timeout", type=float, default=2.0)
    pd.add_argument("--pd-first-chunk-timeout", type=float, default=10.0)
    pd.add_argument("--pd-transfer-timeout", type=float, default=120.0)
    pd.add_argument("--pd-max-peer-waiting", type=int, default=8,
                    help="a prefill node with this many queued requests counts as full")
    pd.add_argument("--pd-wire-dtype", default="", choices=["", "float8_e4m3fn"],
                    help="gRPC transport: send KV as fp8 (e4m3, per-message scale)")
    add_router_args(p)
    add_engine_args(p)
    return p


def add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("router")
    g.add_argument("--router-url", default=None, metavar="HOST:PORT",
                   help="register with a pd-router (its worker event port) and stream KV/session events to it")
    g.add_argument("--advertise-host", default=None,
                   help="host the router should use to reach this node (default: --host, or 127.0.0.1)")


def advertised_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return args.advertise_host
    return "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host


def build_connector(args: argparse.Namespace):
    """The PD connector for --pd-url (or a router naming prefill nodes), or None when colocated."""
    if not args.pd_url and not args.router_url:
        return None
    from pd.decode.pd_connector import DecodeConnector, PDPolicy
    addresses = [a.strip() for item in args.pd_url or [] for a in item.split(",") if a.strip()]
    policy = PDPolicy(min_prompt_tokens=args.pd_min_prompt_tokens, failure=args.pd_failure,
                      first_chunk_timeout_s=args.pd_first_chunk_timeout,
                      transfer_timeout_s=args.pd_transfer_timeout, max_peer_waiting=args.pd_max_peer_waiting,
                      wire_dtype=args.pd_wire_dtype)
    return DecodeConnector(addresses, policy)


def default_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.hub_id:
        return args.hub_id
    path = args.weights_dir or args.gguf_file
    if path:
        return os.path.basename(os.path.normpath(path))
    return "SmolLM2-135M-Instruct"


def build_state(args: argparse.Namespace, role: str = "decode") -> NodeState:
    from engine.async_engine import AsyncEngine
    builder = builder_from_args(args)
    connector = build_connector(args)
    if connector is not None:
        builder.connector(connector)
    llm = builder.build_llm_engine()
    name = default_model_name(args)
    metrics = ServingMetrics(name, llm.stats, lambda: _session_metrics(llm))
    if connector is not None:
        connector.attach(llm, args.pd_transport, args.pd_connect_timeout, metrics)
        connector.start()
    engine = AsyncEngine(llm).start()
    keys = frozenset(args.api_key or ([os.environ["PDSERVE_API_KEY"]] if os.environ.get("PDSERVE_API_KEY") else []))
    return NodeState(engine=engine, tokenizer=llm.tokenizer, model_name=name, max_model_len=llm.max_model_len,
                     metrics=metrics, api_keys=keys, max_waiting=args.max_waiting or 4 * args.max_num_seqs,
                     role=role, session_cache=not args.no_session_cache)


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
    reporter = make_reporter(args, state.engine, "decode", state.model_name)
    return asyncio.run(serve_app(app, state, args.host, args.port, args.drain_timeout, "pd-decode",
                                 args.log_level, on_ready=reporter.start if reporter else None,
                                 on_stop=reporter.stop if reporter else None))


def make_reporter(args: argparse.Namespace, engine, role: str, model_name: str, http_port: int | None = None):
    """The router event reporter for --router-url, or None."""
    if not args.router_url:
        return None
    import uuid
    from pd._generated import router_pb2 as rpb
    from pd.router.reporter import RouterReporter
    host = advertised_host(args)
    if role == "decode":
        address, health = f"http://{host}:{args.port}", f"http://{host}:{args.port}/health"
    else:
        address, health = f"{host}:{args.port}", f"http://{host}:{http_port}/health"
    layout = engine.engine.pool.layout
    info = rpb.WorkerInfo(node_id=f"{role}-{host}:{args.port}-{uuid.uuid4().hex[:6]}", role=role, address=address,
                          block_size=layout.block_size, model=model_name, num_blocks=layout.num_blocks,
                          health_url=health)
    return RouterReporter(args.router_url, info, engine)


if __name__ == "__main__":
    sys.exit(main())
