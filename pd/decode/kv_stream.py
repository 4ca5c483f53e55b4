"""Long-lived PrefillStream calls: one transfer at a time each, kept open between transfers.

A new gRPC call costs about half a millisecond here before the first byte moves (call
setup, the server's handler dispatch) and another fraction at its end (trailers): ~10% of
a 512-token transfer. A KVStream is one PrefillStream call that carries one transfer, then
the next: the decode node writes a PrefillRequest, reads that request's messages up to its
Done, and gives the stream back to its peer's idle list. Anything else (an error, a
timeout, an abort, a short stream) cancels the call, which ends that transfer only.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from pd._generated import prefill_pb2 as pb

PREFILL_STREAM = "/pd.v1.PrefillService/PrefillStream"
MAX_IDLE_STREAMS = 8
_END = None


class KVStream:
    """One PrefillStream call. Iterate it for the raw bytes of the current request's
    messages; cancel() ends the call (from any thread). `owner` is the transfer using it:
    cancel(owner) from a late timer or abort is a no-op once the stream serves another."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        method = channel.stream_stream(PREFILL_STREAM, request_serializer=pb.PrefillRequest.SerializeToString,
                                       response_deserializer=None)
        self._call = method(self._request_iter())
        self._responses: Iterator[bytes] = iter(self._call)
        self.cancelled = False
        self.reused = False             # taken from the idle list (it may have died there)
        self.owner: object = None
        self._lock = threading.Lock()

    def _request_iter(self):
        while (request := self._requests.get()) is not _END:
            yield request

    def send(self, request: pb.PrefillRequest, owner: object) -> None:
        with self._lock:
            self.owner = owner
        self._requests.put(request)

    def __iter__(self) -> Iterator[bytes]:
        return self._responses

    def cancel(self, owner: object = None) -> None:
        """Cancels the call; with an owner, only while that transfer is using it."""
        with self._lock:
            if (owner is not None and owner is not self.owner) or self.cancelled:
                return
            self.cancelled = True
        self._requests.put(_END)  # ends grpc's request-consuming thread
        self._call.cancel()

    def disown(self) -> None:
        with self._lock:
            self.owner = None


class StreamPool:
    """A prefill node's idle KVStreams (at most MAX_IDLE_STREAMS); streams of an older
    channel are never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[KVStream] = []

    def acquire(self, channel: grpc.Channel, request: pb.PrefillRequest, owner: object,
                fresh: bool = False) -> KVStream:
        """An idle stream of this channel (unless fresh), or a new one, with the request
        sent on it."""
        with self._lock:
            while self._idle and not fresh:
                stream = self._idle.pop()
                if stream.channel is channel and not stream.cancelled:
                    break
                stream.cancel()
            else:
                stream = None
        if stream is None:
            stream = KVStream(channel)
        else:
            stream.reused = True
        stream.send(request, owner)
        return stream

    def release(self, stream: KVStream, reusable: bool) -> None:
        """Back to the idle list after a complete transfer (its Done read); else cancelled."""
        stream.disown()
        with self._lock:
            if reusable and not stream.cancelled and len(self._idle) < MAX_IDLE_STREAMS:
                self._idle.append(stream)
                return
        stream.cancel()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for stream in idle:
            stream.cancel()

    @property
    def num_idle(self) -> int:
        return len(self._idle)


class Deadlines:
    """Calls fn(*args) at a monotonic deadline, from one daemon thread for all transfers (a
    threading.Timer per transfer would start a thread per timeout). Callbacks must be cheap
    and must check for themselves whether they still apply."""

    def __init__(self, name: str = "pd-deadlines"):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, object, tuple]] = []
        self._seq = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call_later(self, seconds: float, fn, *args) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq, fn, args))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:  # a callback's bug must not stop every other timeout
                logging.getLogger(__name__).exception("deadline callback failed")
