"""Router side of the worker event stream: sequence checks, resyncs, index updates."""
from __future__ import annotations

import logging

import grpc

from pd._generated import router_pb2 as rpb
from pd._generated import router_pb2_grpc as rpb_grpc
from pd.router.registry import Registry

logger = logging.getLogger("pd.router.events")


class RouterEventService(rpb_grpc.RouterServiceServicer):
    def __init__(self, registry: Registry):
        self.registry = registry
        self.index = registry.index
        self.num_resyncs = 0
        self.num_events = 0

    async def Connect(self, request_iterator, context):
        node_id: str | None = None
        expected: int | None = None      # None: waiting for a full state
        deregistered = False
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("payload")
                if kind == "register":
                    info = msg.register
                    node_id = info.node_id
                    self.registry.register(node_id, info.role, info.address, info.health_url, info.block_size,
                                           info.num_blocks)
                    self.index.purge(node_id)
                    expected = None
                    continue
                if node_id is None:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "send register first")
                self.num_events += 1
                if kind == "full_state":
                    self.index.replace(node_id, msg.full_state.hashes, msg.full_state.sessions)
                    self._load(node_id, msg.full_state.load)
                    self.registry.seen(node_id)
                    expected = msg.seq + 1
                    continue
                if not self.registry.is_up(node_id) and kind != "deregister":
                    # back from silence (purged meanwhile): routable again only after a full state
                    self.registry.seen(node_id, mark_up=False)
                    if expected is not None:
                        expected = None
                        self.num_resyncs += 1
                        yield rpb.RouterMessage(resync=rpb.Resync(reason="node was marked down; send full state"))
                    continue
                self.registry.seen(node_id)
                if kind == "deregister":
                    deregistered = True
                    self.registry.remove(node_id, msg.deregister.reason or "deregistered")
                    return
                if expected is None:
                    continue  # a resync is on its way; these events are in it
                if msg.seq != expected:
                    self.num_resyncs += 1
                    reason = f"gap: got event {msg.seq}, expected {expected}"
                    logger.info("event stream of %s: %s; asking for a resync", node_id, reason)
                    expected = None
                    yield rpb.RouterMessage(resync=rpb.Resync(reason=reason))
                    continue
                expected += 1
                self._apply(node_id, kind, msg)
        finally:
            if node_id is not None and not deregistered:
                self.registry.mark_down(node_id, "event stream closed")

    def _apply(self, node_id: str, kind: str, msg: rpb.WorkerMessage) -> None:
        if kind == "blocks":
            (self.index.stored if msg.blocks.stored else self.index.removed)(node_id, msg.blocks.hashes)
        elif kind == "session":
            (self.index.session_resident if msg.session.resident else self.index.session_evicted)(
                node_id, msg.session.session_key)
        elif kind == "load":
            self._load(node_id, msg.load)

    def _load(self, node_id: str, load: rpb.LoadReport) -> None:
        w = self.registry.workers.get(node_id)
        if w is not None:
            v = w.view
            v.num_running, v.num_waiting = load.num_running, load.num_waiting
            v.num_free_blocks, v.num_blocks = load.num_free_blocks, max(load.num_blocks, 1)
