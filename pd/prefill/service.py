"""PrefillService servicer: thin glue between gRPC messages and the prefill engine."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from engine.async_engine import AsyncEngine
from pd._generated import prefill_pb2 as pb
from pd._generated import prefill_pb2_grpc as pb_grpc
from pd.prefill.connector import KVPiece, LocalPiece, PrefillConnector, StreamSink
from pd.transport.fingerprint import PROTOCOL_VERSION, engine_fingerprint, engine_kv_spec, host_id, incompatibility
from pd.transport.messages import (fingerprint_from_pb, fingerprint_to_pb, kv_spec_from_pb, kv_spec_to_pb,
                                   logprobs_to_pb, sampling_from_pb)
from pd.transport.kv_frames import kv_messages
from pd.transport.wire import wire_nbytes

logger = logging.getLogger("pd.prefill")
DEFAULT_MAX_MESSAGE_BYTES = 2 << 20  # best of 1-4 MiB in bench/bench_transfer.py


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, engine: AsyncEngine, connector: PrefillConnector, local_pool: pb.LocalPool | None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, metrics=None):
        self.engine = engine
        self.connector = connector
        self.local_pool = local_pool
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        llm = engine.engine
        self.fingerprint = engine_fingerprint(llm)
        self.kv_spec = engine_kv_spec(llm)
        self.host_id = host_id()
        self.node_id = f"prefill-{uuid.uuid4().hex[:8]}"
        self.max_model_len = llm.max_model_len

    async def Handshake(self, request: pb.HandshakeRequest, context) -> pb.HandshakeResponse:
        reason = incompatibility(self.fingerprint, self.kv_spec, fingerprint_from_pb(request.model),
                                 kv_spec_from_pb(request.kv), request.protocol_version)
        reply = pb.HandshakeResponse(accepted=reason is None, reason=reason or "",
                                     protocol_version=PROTOCOL_VERSION, model=fingerprint_to_pb(self.fingerprint),
                                     kv=kv_spec_to_pb(self.kv_spec), node_id=self.node_id,
                                     max_model_len=self.max_model_len)
        if reason is not None:
            logger.warning("refused handshake from %s: %s", request.node_id or "?", reason)
            return reply
        same_host = request.host_id == self.host_id
        for transport in request.transports:
            if transport == "local" and same_host and self.local_pool is not None:
                reply.transport = "local"
                reply.local_pool.CopyFrom(self.local_pool)
                break
            if transport == "grpc":
                reply.transport = "grpc"
                break
        if not reply.transport:
            reply.accepted, reply.reason = False, "no common transport (offered: %s)" % list(request.transports)
        logger.info("handshake from %s accepted: transport %s", request.node_id or "?", reply.transport)
        return reply

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        s = self.engine.engine.stats()
        return pb.HealthResponse(ready=self.engine.is_running, num_running=s.num_running,
                                 num_waiting=s.num_waiting, num_free_blocks=s.num_free_blocks,
                                 num_blocks=s.num_blocks, node_id=self.node_id)

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self.connector.release(request.lease_id))

    async def Prefill(self, request: pb.PrefillRequest, context):
        async for message in self._prefill(request, context):
            yield message

    async def PrefillStream(self, requests, context):
        """Prefill for each request in turn on one long-lived call (the decode node sends the
        next request after the previous one's Done)."""
        async for request in requests:
            async for message in self._prefill(request, context):
                yield message

    async def _prefill(self, request: pb.PrefillRequest, context):
        transport = request.transport or "grpc"
        if transport not in ("grpc", "local") or (transport == "local" and self.local_pool is None):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transport {transport!r} is not available")
        try:
            params = sampling_from_pb(request.sampling)
            req = self.engine.make_request(list(request.token_ids), params,
                                           request_id=f"{request.request_id or 'pd'}-{uuid.uuid4().hex[:8]}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.skip_tokens >= len(request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "skip_tokens must be below the prompt length")
        wire = request.wire_dtype or None
        queue: asyncio.Queue = asyncio.Queue()
        sink = StreamSink(asyncio.get_running_loop(), queue, transport, request.skip_tokens)
        self.connector.open_stream(req.request_id, sink)
        pump = asyncio.create_task(self._pump(req, queue))
        t0, num_msgs, num_bytes = time.monotonic(), 0, 0
        pending = None
        try:
            while True:
                if pending is not None:
                    item, pending = pending, None
                else:
                    item = await queue.get()
                if isinstance(item, KVPiece):
                    # pack the pieces that are ready now (the network is behind the model)
                    pieces, ready = [item], 2 * wire_nbytes(item.k, wire)
                    while ready < self.max_message_bytes and not queue.empty():
                        pending = queue.get_nowait()
                        if not isinstance(pending, KVPiece):
                            break
                        pieces.append(pending)
                        ready, pending = ready + 2 * wire_nbytes(pending.k, wire), None
                    for msg in kv_messages([(p.layer, p.start, p.k, p.v) for p in pieces], wire,
                                           self.max_message_bytes):
                        num_msgs += 1
                        yield msg
                    num_bytes += sum(2 * wire_nbytes(p.k, wire) for p in pieces)
                elif isinstance(item, LocalPiece):
                    num_msgs += 1
                    yield pb.PrefillMessage(local=pb.LocalChunk(layer=item.layer, start=item.start,
                                                                 num_tokens=item.num_tokens,
                                                                 block_ids=item.block_ids))
                elif isinstance(item, Exception):
                    await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {item}")
                else:
                    if item.finish_reason in ("error", "abort"):
                        await context.abort(grpc.StatusCode.INTERNAL, item.error or "prefill failed")
                    # log and count first: the peer may drop the call as soon as it has Done
                    self._log(request, transport, t0, num_bytes, item.num_cached_tokens)
                    yield pb.PrefillMessage(done=pb.PrefillDone(
                        first_token_id=item.new_token_ids[0], logprobs=logprobs_to_pb(
                            item.logprobs[0] if item.logprobs else None),
                        num_cached_tokens=item.num_cached_tokens, num_tokens=len(request.token_ids),
                        lease_id=sink.lease_id or 0, num_kv_messages=num_msgs))
                    return
        finally:
            self.connector.close_stream(req.request_id)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self, req, queue: asyncio.Queue) -> None:
        try:
            async for out in self.engine.generate(req):
                if out.finished:
                    await queue.put(out)
        except Exception as exc:  # engine died
            await queue.put(exc)

    def _log(self, request, transport: str, t0: float, num_bytes: int, cached: int) -> None:
        ms = (time.monotonic() - t0) * 1e3
        n = len(request.token_ids) - request.skip_tokens
        if transport == "grpc":
            logger.info("prefill %s: %d tokens (%d cached here), sent %d KV bytes in %.1f ms (%.1f MB/s), "
                        "transport grpc", request.request_id, n, cached, num_bytes, ms,
                        num_bytes / 1e6 / max(ms / 1e3, 1e-9))
        else:
            logger.info("prefill %s: %d tokens (%d cached here) in %.1f ms, transport local (shared memory)",
                        request.request_id, n, cached, ms)
        if self.metrics is not None:
            self.metrics.prefill_done(transport, n, num_bytes, ms / 1e3)


def _serialize(message) -> bytes:
    """KV messages come pre-serialized (kv_frames.kv_messages); the rest are protobuf objects."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(servicer: PrefillServicer, server) -> None:
    """Registers the PrefillService on a grpc(.aio) server; the generated registration,
    except that Prefill's stream may carry pre-serialized bytes."""
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake, request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeResponse.SerializeToString),
        "Prefill": grpc.unary_stream_rpc_method_handler(
            servicer.Prefill, request_deserializer=pb.PrefillRequest.FromString, response_serializer=_serialize),
        "PrefillStream": grpc.stream_stream_rpc_method_handler(
            servicer.PrefillStream, request_deserializer=pb.PrefillRequest.FromString,
            response_serializer=_serialize),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release, request_deserializer=pb.ReleaseRequest.FromString,
            response_serializer=pb.ReleaseResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pd.v1.PrefillService", handlers),))
    server.add_registered_method_handlers("pd.v1.PrefillService", handlers)
