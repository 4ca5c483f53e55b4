"""Worker side of the router event stream: register, report KV/session events and load.

Listeners on the engine's block pool and session cache (engine thread) queue events; a
sender thread streams them to the router with sequence numbers. A (re)connect or a
router's resync request sends the full state, snapshotted on the engine thread with a
marker in the queue so that events older than the snapshot are dropped, not replayed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from engine.async_engine import AsyncEngine
from pd._generated import router_pb2 as rpb
from pd._generated import router_pb2_grpc as rpb_grpc

logger = logging.getLogger("pd.router.reporter")
_MARKER = object()


@dataclass
class _Snapshot:
    hashes: list[int]
    sessions: list[str]
    load: rpb.LoadReport


class RouterReporter:
    def __init__(self, router_address: str, info: rpb.WorkerInfo, engine: AsyncEngine,
                 heartbeat_s: float = 1.0):
        self.router_address = router_address
        self.info = info
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._resync = threading.Event()
        self._seq = 0
        self._drop = 0
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-reporter", daemon=True)
        llm = engine.engine
        llm.block_pool.listeners.append(self._on_blocks)
        llm.scheduler.sessions.listeners.append(self._on_session)

    def start(self) -> "RouterReporter":
        self._thread.start()
        return self

    def stop(self, reason: str = "shutdown") -> None:
        self._events.put(rpb.WorkerMessage(deregister=rpb.Deregister(reason=reason)))
        self._stop.set()
        self._thread.join(3.0)

    def drop_next_events(self, n: int) -> None:
        """Test hook: skip the next n events (their sequence numbers are consumed), making a gap."""
        self._drop += n

    # ---- engine thread -------------------------------------------------------------------
    def _on_blocks(self, kind: str, hashes: list[int]) -> None:
        self._events.put(rpb.WorkerMessage(blocks=rpb.BlockEvent(stored=kind == "stored", hashes=hashes)))

    def _on_session(self, kind: str, key: str) -> None:
        self._events.put(rpb.WorkerMessage(session=rpb.SessionEvent(resident=kind == "resident", session_key=key)))

    def _snapshot(self, llm) -> _Snapshot:
        self._events.put(_MARKER)
        s = llm.stats()
        return _Snapshot(llm.block_pool.cached_hashes(), list(llm.scheduler.sessions.sessions),
                         rpb.LoadReport(num_running=s.num_running, num_waiting=s.num_waiting,
                                        num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks))

    # ---- sender thread ---------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                channel = grpc.insecure_channel(self.router_address)
                grpc.channel_ready_future(channel).result(timeout=2.0)
                responses = rpb_grpc.RouterServiceStub(channel).Connect(self._messages())
                self.connected.set()
                backoff = 0.5
                logger.info("registered with router %s as %s (%s)", self.router_address, self.info.node_id,
                            self.info.role)
                for msg in responses:
                    if msg.WhichOneof("payload") == "resync":
                        logger.info("router asked for a resync: %s", msg.resync.reason)
                        self._resync.set()
                        self._events.put(None)  # wake the sender
            except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
                if not self._stop.is_set():
                    logger.warning("router %s unreachable (%s); retrying in %.1f s", self.router_address,
                                   type(exc).__name__, backoff)
            finally:
                self.connected.clear()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _next(self, payload: dict) -> rpb.WorkerMessage:
        self._seq += 1
        return rpb.WorkerMessage(seq=self._seq, **payload)

    def _full_state(self) -> rpb.WorkerMessage:
        snap = self.engine.call_sync(self._snapshot, timeout=10.0)
        while self._events.get() is not _MARKER:  # older events are in the snapshot already
            pass
        return self._next({"full_state": rpb.FullState(hashes=snap.hashes, sessions=snap.sessions, load=snap.load)})

    def _messages(self):
        yield self._next({"register": self.info})
        yield self._full_state()
        last_beat = time.monotonic()
        while not self._stop.is_set() or not self._events.empty():
            if self._resync.is_set():
                self._resync.clear()
                yield self._full_state()
            timeout = max(0.0, self.heartbeat_s - (time.monotonic() - last_beat))
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if event is None or event is _MARKER:
                if time.monotonic() - last_beat >= self.heartbeat_s:
                    last_beat = time.monotonic()
                    yield self._next({"load": self._load()})
                continue
            if event.WhichOneof("payload") == "deregister":
                yield self._next({"deregister": event.deregister})
                return
            if self._drop > 0:
                self._drop -= 1
                self._seq += 1
                continue
            yield self._next({event.WhichOneof("payload"): getattr(event, event.WhichOneof("payload"))})

    def _load(self) -> rpb.LoadReport:
        s = self.engine.engine.stats()  # plain integer reads; a slightly stale view is fine
        return rpb.LoadReport(num_running=s.num_running, num_waiting=s.num_waiting,
                              num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks)
