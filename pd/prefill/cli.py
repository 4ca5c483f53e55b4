"""pd-prefill: a prefill node (gRPC), with health and Prometheus metrics over HTTP."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from engine.args import add_engine_args, builder_from_args, setup_logging
from engine.async_engine import AsyncEngine
from pd._generated import prefill_pb2 as pb
from pd.decode.cli import add_router_args, default_model_name, make_reporter
from pd.prefill.connector import PrefillConnector
from pd.prefill.metrics import PrefillMetrics
from pd.prefill.service import DEFAULT_MAX_MESSAGE_BYTES, PrefillServicer, add_servicer

logger = logging.getLogger("pd.prefill")
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-prefill", description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="gRPC port")
    p.add_argument("--http-port", type=int, default=None, help="health/metrics HTTP port (default: port + 1)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--lease-timeout", type=float, default=30.0,
                   help="seconds a local-transport lease keeps blocks for a decode node that never releases")
    p.add_argument("--no-local-transport", action="store_true",
                   help="don't put the KV pool in shared memory (gRPC transport only)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="upper bound of one KV message on the gRPC transport")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    add_router_args(p)
    add_engine_args(p)
    p.set_defaults(max_num_batched_tokens=4096)
    return p


class PrefillNode:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.shm = None
        self.connector = PrefillConnector(args.lease_timeout)
        builder = builder_from_args(args).connector(self.connector)
        if not args.no_local_transport and args.device == "cpu":
            builder.kv_buffer(self._shm_buffer)
        llm = builder.build_llm_engine()
        self.engine = AsyncEngine(llm).start()
        self.model_name = default_model_name(args)
        self.metrics = PrefillMetrics(self.model_name, llm.stats)
        local = None
        if self.shm is not None:
            local = pb.LocalPool(kind="shm", name=self.shm.name, size_bytes=self.shm.size,
                                 num_blocks=llm.pool.layout.num_blocks, device="cpu")
        elif not args.no_local_transport and args.device.startswith("cuda"):
            from pd.transport.cuda_ipc import export_handle  # GPU only: CUDA IPC over the same protocol
            local = pb.LocalPool(kind="cuda_ipc", cuda_ipc_handle=export_handle(llm.pool.data),
                                 size_bytes=llm.pool.layout.total_bytes, num_blocks=llm.pool.layout.num_blocks,
                                 device=args.device)
        self.servicer = PrefillServicer(self.engine, self.connector, local, args.max_message_bytes, self.metrics)
        self.draining = False

    def _shm_buffer(self, num_bytes: int):
        from pd.transport.shm import SharedKVBuffer
        self.shm = SharedKVBuffer.create(num_bytes)
        logger.info("KV pool in shared memory %s (%.1f MiB) for the local transport", self.shm.name,
                    num_bytes / (1 << 20))
        return self.shm.tensor()

    def http_app(self) -> FastAPI:
        app = FastAPI(title="pdserve prefill node", docs_url=None, redoc_url=None)

        @app.get("/health")
        async def health():
            ok = self.engine.is_running and not self.draining
            return JSONResponse({"status": "ok" if ok else "unavailable", "role": "prefill",
                                 "node_id": self.servicer.node_id}, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

        return app

    async def serve(self) -> int:
        args = self.args
        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_servicer(self.servicer, server)
        bound = server.add_insecure_port(f"{args.host}:{args.port}")
        if not bound:
            logger.error("cannot listen on %s:%d", args.host, args.port)
            return 1
        await server.start()
        http_port = args.http_port or args.port + 1
        http = uvicorn.Server(uvicorn.Config(self.http_app(), host=args.host, port=http_port, log_level="warning",
                                             lifespan="off", access_log=False))
        http.install_signal_handlers = lambda: None
        http_task = asyncio.create_task(http.serve())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not http.started and not http_task.done():
            await asyncio.sleep(0.05)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        reporter = make_reporter(args, self.engine, "prefill", self.model_name, http_port)
        if reporter is not None:
            reporter.start()
        print(f"pd-prefill ready: grpc://{shown}:{bound} (health http://{shown}:{http_port}/health, "
              f"model {self.model_name})", flush=True)
        await stop.wait()
        if reporter is not None:
            reporter.stop()
        logger.info("stopping: finishing in-flight prefills (up to %.0f s)", args.drain_timeout)
        self.draining = True
        await server.stop(args.drain_timeout)
        http.should_exit = True
        await http_task
        self.engine.shutdown()
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:  # the engine's pool still views it; it is unlinked at exit
                logger.debug("shared KV pool still mapped; unlinking at exit")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        node = PrefillNode(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pd-prefill: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(node.serve())


if __name__ == "__main__":
    sys.exit(main())
