"""AsyncEngine: the step loop on a background thread, per-request asyncio streams, abort.

All engine state is touched only by the loop thread. Callers post commands (add,
abort, call) to a queue; outputs come back to each request's asyncio.Queue through
its event loop's call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05
_REMOTE_POLL_S = 0.002


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- requests -------------------------------------------------------------------------
    def make_request(self, prompt_token_ids: list[int], params: SamplingParams, **kwargs: Any) -> Request:
        """Validates and builds a request (raises ValueError for bad input) without queuing it."""
        return self.engine.make_request(prompt_token_ids, params, **kwargs)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queues the request and yields its outputs; leaving early aborts it."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._post("add", request)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._post("abort", rid)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) on the loop thread (e.g. embeddings, stats) and awaits its result."""
        fut: Future = Future()
        self._post("call", (fn, fut))
        return await asyncio.wrap_future(fut)

    def call_sync(self, fn: Callable[[LLMEngine], Any], timeout: float | None = None) -> Any:
        fut: Future = Future()
        self._post("call", (fn, fut))
        return fut.result(timeout)

    def _post(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    # ---- the loop thread --------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a failing step must not kill the server
                    logger.exception("engine step failed; failing its requests")
                    self._fail_all(exc)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
                sched = self.engine.scheduler
                if not outputs and not sched.running and not sched.waiting:
                    # only remote loads / delayed frees pending: poll the connector gently
                    self._wake.wait(_REMOTE_POLL_S)
                    self._wake.clear()
        except BaseException as exc:  # pragma: no cover - last resort
            self.error = exc
            logger.exception("engine loop died")
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine loop died: {exc}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(payload)
                except ValueError as exc:  # e.g. a duplicate id: fail that request only
                    self._deliver(payload.request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(payload)
            elif kind == "call":
                fn, fut = payload
                try:
                    fut.set_result(fn(self.engine))
                except Exception as exc:
                    fut.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        for req in list(self.engine.scheduler.requests.values()):
            self.engine.abort_request(req.request_id)
            self._deliver(req.request_id, RequestOutput(
                req.request_id, [], "", finished=True, finish_reason="error",
                error=f"internal engine error: {exc}"))

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                self._streams.pop(request_id, None)
