"""Prefill-side KV connector: hands each finished layer of each chunk to the request's stream.

Runs on the engine thread: after every layer of a forward pass it picks, for each request
being streamed, the token positions computed (or found cached) since the last layer message
and posts them to that request's asyncio queue. gRPC streams get a copy of the KV; local
streams get block ids only, and the request's blocks stay leased after it finishes until
the decode node releases them (or the lease expires).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from engine.kv_cache.kv_pool import KVPool
from engine.kv_connector import FinishedTransfers, KVConnector
from engine.request import Request, RequestStatus
from engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


@dataclass
class StreamSink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    transport: str          # "grpc" | "local"
    sent_upto: int          # positions below this were sent (or were the decode node's)
    lease_id: int | None = None
    step_range: tuple[int, int] | None = None

    def post(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class KVPiece:
    layer: int
    start: int
    k: torch.Tensor   # [n, kv_heads, head_dim] copy (grpc)
    v: torch.Tensor


@dataclass
class LocalPiece:
    layer: int
    start: int
    num_tokens: int
    block_ids: list[int]


@dataclass
class Lease:
    request_id: str
    expires_at: float


class PrefillConnector(KVConnector):
    def __init__(self, lease_timeout_s: float = 30.0):
        self.lease_timeout_s = lease_timeout_s
        self.pool: KVPool | None = None
        self.block_tables: dict[str, list[int]] = {}
        self._sinks: dict[str, StreamSink] = {}
        self._step: list[tuple[str, StreamSink]] = []
        self._leases: dict[int, Lease] = {}
        self._released: set[int] = set()
        self._lease_ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def wants_layer_hooks(self) -> bool:
        return bool(self._sinks)

    def register_kv_pool(self, pool: KVPool, block_tables: dict[str, list[int]]) -> None:
        self.pool = pool
        self.block_tables = block_tables

    # ---- called from the gRPC handlers (event-loop thread) -----------------------------
    def open_stream(self, request_id: str, sink: StreamSink) -> None:
        with self._lock:
            self._sinks[request_id] = sink

    def close_stream(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)

    def release(self, lease_id: int) -> bool:
        with self._lock:
            if lease_id not in self._leases:
                return False
            self._released.add(lease_id)
            return True

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    # ---- engine thread ----------------------------------------------------------------
    def on_step_start(self, scheduled: list[ScheduledRequest]) -> None:
        self._step = []
        with self._lock:
            sinks = dict(self._sinks)
        for s in scheduled:
            sink = sinks.get(s.request.request_id)
            if sink is not None:
                end = s.start + s.num_new_tokens
                sink.step_range = (sink.sent_upto, end)
                self._step.append((s.request.request_id, sink))

    def on_layer_done(self, layer_index: int) -> None:
        last = self.pool.layout.num_layers - 1
        for rid, sink in self._step:
            start, end = sink.step_range
            if end <= start:
                continue
            table = self.block_tables[rid]
            if sink.transport == "local":
                sink.post(LocalPiece(layer_index, start, end - start, list(table)))
            else:
                slots = _slots(table, start, end, self.pool.layout.block_size)
                kv = self.pool.data[layer_index]
                sink.post(KVPiece(layer_index, start, kv[0].index_select(0, slots), kv[1].index_select(0, slots)))
            if layer_index == last:
                sink.sent_upto = end

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        with self._lock:
            sink = self._sinks.get(request.request_id)
        if sink is None or sink.transport != "local" or request.status == RequestStatus.FINISHED_ABORTED:
            return False
        lease_id = next(self._lease_ids)
        sink.lease_id = lease_id
        with self._lock:
            self._leases[lease_id] = Lease(request.request_id, time.monotonic() + self.lease_timeout_s)
        return True

    def get_finished(self) -> FinishedTransfers:
        done = FinishedTransfers()
        if not self._leases:
            return done
        now = time.monotonic()
        with self._lock:
            for lease_id, lease in list(self._leases.items()):
                expired = lease.expires_at < now
                if lease_id in self._released or expired:
                    if expired and lease_id not in self._released:
                        logger.warning("lease %d of %s expired after %.0f s; freeing its blocks", lease_id,
                                       lease.request_id, self.lease_timeout_s)
                    del self._leases[lease_id]
                    self._released.discard(lease_id)
                    done.sent.add(lease.request_id)
        return done

    def describe(self) -> dict:
        return {"kind": "prefill", "streams": len(self._sinks), "leases": len(self._leases)}


def _slots(table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
