"""A prefill node as the decode node sees it: channel, handshake, health, backoff."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc

from pd._generated import prefill_pb2 as pb
from pd._generated import prefill_pb2_grpc as pb_grpc
from pd.decode.kv_stream import KVStream, StreamPool
from pd.transport.fingerprint import PROTOCOL_VERSION, Fingerprint, KVSpec, host_id
from pd.transport.messages import fingerprint_to_pb, kv_spec_to_pb

logger = logging.getLogger("pd.decode.peer")
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0


class HandshakeRefused(RuntimeError):
    pass


class PrefillPeer:
    def __init__(self, address: str, fingerprint: Fingerprint, kv_spec: KVSpec, transport: str = "auto",
                 connect_timeout_s: float = 2.0, health_timeout_s: float = 1.0):
        if transport not in ("auto", "grpc", "local"):
            raise ValueError(f"--pd-transport must be auto, grpc or local, got {transport!r}")
        self.address = address
        self.fingerprint = fingerprint
        self.kv_spec = kv_spec
        self.transport_pref = transport
        self.connect_timeout_s = connect_timeout_s
        self.health_timeout_s = health_timeout_s
        self.node_id = f"decode-{uuid.uuid4().hex[:8]}"
        self.lock = threading.Lock()
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.PrefillServiceStub | None = None
        self.streams = StreamPool()     # idle PrefillStream calls (raw responses, read by kv_frames)
        self.transport: str | None = None
        self.shm = None
        self.local_pool = None          # torch view [layers, 2, slots, heads, dim] of the peer's pool
        self.healthy = False
        self.refused: str | None = None
        self.load = pb.HealthResponse()
        self.backoff_s = MIN_BACKOFF_S
        self.next_attempt = 0.0
        self.num_inflight = 0

    # ---- connection --------------------------------------------------------------------
    def connect(self, layout) -> bool:
        """Handshake (and map the shared pool for the local transport); False on failure."""
        try:
            channel = grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            stub = pb_grpc.PrefillServiceStub(channel)
            offered = {"auto": ["local", "grpc"], "grpc": ["grpc"], "local": ["local"]}[self.transport_pref]
            reply = stub.Handshake(pb.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION, model=fingerprint_to_pb(self.fingerprint),
                kv=kv_spec_to_pb(self.kv_spec), transports=offered, host_id=host_id(), node_id=self.node_id),
                timeout=self.connect_timeout_s)
            if not reply.accepted:
                channel.close()
                self.refused = reply.reason
                raise HandshakeRefused(reply.reason)
            local = self._map_local(reply, layout) if reply.transport == "local" else None
        except HandshakeRefused as exc:
            self._failed(f"handshake refused: {exc}")
            return False
        except (grpc.RpcError, grpc.FutureTimeoutError, OSError, ValueError) as exc:
            self._failed(f"cannot reach prefill node: {_describe(exc)}")
            return False
        with self.lock:
            self.close()
            self.channel, self.stub, self.transport = channel, stub, reply.transport
            self.shm, self.local_pool = local if local else (None, None)
            self.healthy, self.refused = True, None
            self.backoff_s = MIN_BACKOFF_S
        logger.info("connected to prefill node %s (%s), transport %s", self.address, reply.node_id, self.transport)
        return True

    def _map_local(self, reply: pb.HandshakeResponse, layout):
        """Maps the peer's KV pool once: POSIX shared memory on CPU, CUDA IPC on GPU."""
        pool = reply.local_pool
        if pool.kind == "cuda_ipc":
            from pd.transport.cuda_ipc import import_handle
            shm, view = None, import_handle(pool.cuda_ipc_handle).reshape(-1)
        else:
            from pd.transport.shm import SharedKVBuffer
            shm = SharedKVBuffer.attach(pool.name, pool.size_bytes)
            view = shm.tensor().view(layout.dtype)
        per_block = layout.bytes_per_block // layout.itemsize
        view = view[:per_block * pool.num_blocks].view(
            layout.num_layers, 2, pool.num_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim)
        return shm, view

    def start_transfer(self, request: pb.PrefillRequest, owner: object, fresh: bool = False) -> KVStream | None:
        """Sends a PrefillRequest on an idle PrefillStream call (or, if fresh or none is
        idle, a new one) for `owner` (the transfer); None when the peer is disconnected."""
        channel = self.channel
        return None if channel is None else self.streams.acquire(channel, request, owner, fresh)

    def end_transfer(self, stream: KVStream, complete: bool) -> None:
        """A transfer is over: its stream goes back to the idle list if the transfer read
        its Done, else the call is cancelled."""
        self.streams.release(stream, reusable=complete and stream.channel is self.channel)

    def close(self) -> None:
        """Drops the channel and the shared-memory mapping (caller holds the lock or owns the peer)."""
        self.streams.close()
        if self.channel is not None:
            self.channel.close()
        self.channel = self.stub = None
        self.local_pool = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                logger.debug("shared pool of %s still referenced; closed later", self.address)
            self.shm = None

    # ---- health ----------------------------------------------------------------------------
    def check(self, layout) -> None:
        """One health probe (reconnecting with backoff when down)."""
        if not self.healthy:
            if time.monotonic() >= self.next_attempt:
                self.connect(layout)
            return
        try:
            self.load = self.stub.Health(pb.HealthRequest(), timeout=self.health_timeout_s)
            if not self.load.ready:
                self.mark_down("prefill node reports not ready")
        except (grpc.RpcError, AttributeError) as exc:
            self.mark_down(f"health check failed: {_describe(exc)}")

    def mark_down(self, reason: str) -> None:
        with self.lock:
            if self.healthy:
                logger.warning("prefill node %s marked down: %s", self.address, reason)
            self.healthy = False
            self.next_attempt = time.monotonic() + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
            if self.num_inflight == 0:
                self.close()

    def _failed(self, reason: str) -> None:
        if self.healthy or self.next_attempt == 0.0:
            logger.warning("prefill node %s unavailable: %s (retry in %.1f s)", self.address, reason, self.backoff_s)
        self.healthy = False
        self.next_attempt = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)

    def is_overloaded(self, max_waiting: int) -> bool:
        return self.load.num_waiting >= max_waiting


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
