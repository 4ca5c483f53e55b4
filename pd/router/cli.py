"""pd-router: OpenAI-compatible front door for many prefill and decode nodes.

    pd-router --prefill 127.0.0.1:8000 --decode 127.0.0.1:8080 --decode 127.0.0.1:8081
    pd-decode --router-url 127.0.0.1:8889 ...   # nodes may also register themselves (gRPC port)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import grpc
import httpx

from engine.args import add_model_args, repo_from_args, setup_logging
from pd._generated import prefill_pb2 as pb
from pd._generated import prefill_pb2_grpc as pb_grpc
from pd._generated import router_pb2_grpc as rpb_grpc
from pd.router.events import RouterEventService
from pd.router.index import ResidencyIndex
from pd.router.metrics import RouterMetrics
from pd.router.policy import POLICIES, make_policy
from pd.router.registry import Registry
from pd.router.server import RouterState, create_router_app
from pd.serve import serve_app

logger = logging.getLogger("pd.router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8888, help="OpenAI HTTP port")
    p.add_argument("--grpc-port", type=int, default=None, help="worker event port (default: port + 1)")
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT", help="prefill node (gRPC)")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT", help="decode node (HTTP)")
    p.add_argument("--policy", default="cache_aware", choices=sorted(POLICIES))
    p.add_argument("--api-key", action="append", default=None)
    p.add_argument("--min-remote-prefill-tokens", type=int, default=128)
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--served-model-name", default=None)
    add_model_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def health_loop(registry: Registry, client: httpx.AsyncClient, interval: float) -> None:
    channels: dict[str, grpc.aio.Channel] = {}
    while True:
        for w in list(registry.workers.values()):
            v = w.view
            if w.registered:
                continue  # heartbeats over the event stream
            try:
                if v.role == "decode":
                    r = await client.get(w.health_url, timeout=interval)
                    ok = r.status_code == 200
                else:
                    ch = channels.setdefault(v.address, grpc.aio.insecure_channel(v.address))
                    h = await pb_grpc.PrefillServiceStub(ch).Health(pb.HealthRequest(), timeout=interval)
                    ok = h.ready
                    v.num_running, v.num_waiting = h.num_running, h.num_waiting
                    v.num_free_blocks, v.num_blocks = h.num_free_blocks, max(h.num_blocks, 1)
            except (httpx.HTTPError, grpc.RpcError) as exc:
                ok = False
                reason = f"health check failed: {type(exc).__name__}"
            else:
                reason = "health check: not ready"
            if ok:
                registry.mark_up(v.node_id)
            else:
                registry.mark_down(v.node_id, reason)
        registry.expire_silent()
        await asyncio.sleep(interval)


async def run(args: argparse.Namespace) -> int:
    tokenizer = repo_from_args(args).open().tokenizer
    index = ResidencyIndex()
    registry = Registry(index, heartbeat_timeout_s=3 * args.health_interval)
    for addr in args.prefill:
        registry.add_static("prefill", addr)
    for addr in args.decode:
        registry.add_static("decode", addr)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    state = RouterState(registry, make_policy(args.policy, args.min_remote_prefill_tokens), tokenizer,
                        RouterMetrics(lambda: [w.view for w in registry.workers.values()]), client,
                        frozenset(args.api_key or ()), args.max_retries)
    events = grpc.aio.server()
    rpb_grpc.add_RouterServiceServicer_to_server(RouterEventService(registry), events)
    grpc_port = args.grpc_port or args.port + 1
    if not events.add_insecure_port(f"{args.host}:{grpc_port}"):
        logger.error("cannot listen on %s:%d", args.host, grpc_port)
        return 1
    await events.start()
    health = asyncio.create_task(health_loop(registry, client, args.health_interval))
    app = create_router_app(state)
    app_state = _AppState(args.served_model_name or "router")
    logger.info("router: policy %s, events on %s:%d, %d static prefill / %d static decode nodes", args.policy,
                args.host, grpc_port, len(args.prefill), len(args.decode))
    try:
        return await serve_app(app, app_state, args.host, args.port, 10.0, "pd-router", args.log_level)
    finally:
        health.cancel()
        await events.stop(1.0)
        await client.aclose()


class _AppState:
    """What serve_app needs to know about the router (it has no engine of its own)."""

    def __init__(self, name: str):
        self.model_name = name
        self.draining = False
        self.engine = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return asyncio.run(run(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pd-router: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
