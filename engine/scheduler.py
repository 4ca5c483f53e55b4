"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Every step has a token budget. Running requests go first (one token for a decode, the
next chunk for a prefill in progress); when blocks run out, the most recently admitted
running request is preempted (its blocks freed, to be recomputed later). Then waiting
requests are admitted in arrival order while budget, sequence slots and blocks last.
Requests whose prompt KV comes from a remote node wait in their own set until the
connector reports the load finished (or failed).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.session_cache import SessionCache
from engine.kv_connector import KVConnector, RemotePrefillResult
from engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled
    samples: bool | None = None  # None: sample when the chunk reaches the last known token

    def __post_init__(self) -> None:
        if self.samples is None:
            self.samples = self.start + self.num_new_tokens == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # decodes first
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, max_model_len: int, kv: KVCacheManager,
                 connector: KVConnector | None = None):
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.kv = kv
        self.connector = connector or KVConnector()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}       # waiting for remote KV
        self.sending: dict[str, Request] = {}      # finished, blocks kept while KV is sent
        self.requests: dict[str, Request] = {}
        self.remote_results: list[tuple[Request, RemotePrefillResult]] = []
        self.finalizing: list[Request] = []        # finished session requests: last token's KV next
        self.errored: list[Request] = []           # failed by the connector, not yet reported
        self.sessions = SessionCache(kv.pool, kv.block_size)
        self.num_preemptions = 0
        # Copies KV blocks (src, dst) right away; set by the engine. A session's partial
        # block must be in place before anything (a forward pass, a remote load) writes to it.
        self.copy_blocks: Callable[[list[tuple[int, int]]], None] = lambda copies: None

    # ---- admission -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.remote or self.sending or self.finalizing)

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._poll_connector()
        out = SchedulerOutput()
        budget = self._schedule_finalizing(out, self.cfg.max_num_batched_tokens)
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        out.scheduled.sort(key=lambda s: not s.is_decode)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate_slots(req, n) is None:
                if self.sessions.evict_lru(keep=req.session_key):
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
                budget -= n
                i += 1
                continue
            break
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while (self.waiting and budget > 0
               and len(self.running) + len(self.remote) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            admitted = self._admit(req, out, budget)
            while admitted is False and self.sessions.evict_lru(keep=req.session_key):
                admitted = self._admit(req, out, budget)
            if not admitted:
                return
            if req.status == RequestStatus.RUNNING:
                budget -= out.scheduled[-1].num_new_tokens

    def _admit(self, req: Request, out: SchedulerOutput, budget: int) -> bool | None:
        """Allocates blocks for the waiting head and moves it on. False: blocks are short;
        None: the prompt does not fit this step's budget (chunked prefill off)."""
        blocks, num_hit = self.kv.get_computed_blocks(req)
        hit = self.sessions.lookup(req.session_key, req.all_token_ids) if req.session_key else None
        if hit is not None and hit.num_tokens <= num_hit:
            hit = None
        start = hit.num_tokens if hit is not None else num_hit
        first_time = req.num_cached_tokens < 0
        num_external = (self.connector.get_num_new_matched_tokens(req, start)
                        if first_time and "no_remote" not in req.extra else 0)
        remaining = req.num_tokens - start
        if num_external > 0:
            n = num_external
        else:
            n = min(remaining, budget) if self.cfg.enable_chunked_prefill else remaining
            if n > budget:
                return None
        if hit is not None:
            copies = self.kv.allocate_from_session(req, hit, n)
            if copies is None:
                return False
            self.copy_blocks(copies)
            self.sessions.touch(req.session_key)
        elif self.kv.allocate_slots(req, n, blocks) is None:
            return False
        self._record_admission(req, start)
        self.waiting.popleft()
        req.num_computed_tokens = start
        if num_external > 0:
            req.status = RequestStatus.WAITING_FOR_REMOTE_KV
            self.remote[req.request_id] = req
            self.connector.update_state_after_alloc(req, self.kv.block_table(req.request_id), num_external)
        else:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, start))
        return True

    def _schedule_finalizing(self, out: SchedulerOutput, budget: int) -> int:
        """Computes the KV of a finished session request's last token, then stores the session."""
        pending, self.finalizing = self.finalizing, []
        for req in pending:
            if budget > 0 and self.kv.allocate_slots(req, 1) is not None:
                out.scheduled.append(ScheduledRequest(req, 1, req.num_computed_tokens, samples=False))
                self.finalizing.append(req)
                budget -= 1
            else:
                self._store_session(req)
        return budget

    def _store_session(self, req: Request) -> None:
        tokens, blocks = self.kv.release_for_session(req)
        self.sessions.store(req.session_key, tokens, blocks)

    def _record_admission(self, req: Request, num_hit: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
            self.kv.record_lookup(req.num_tokens, num_hit)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.info("preempted request %s (recompute %d tokens later; %d KV blocks free)",
                    req.request_id, req.num_tokens, self.kv.pool.num_free_blocks)

    # ---- results ---------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advances progress, appends sampled tokens, finishes requests that hit a limit.
        Returns the requests that got a new token this step."""
        updated: list[Request] = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:
                if req in self.finalizing:
                    req.num_computed_tokens += s.num_new_tokens
                    self.kv.cache_full_blocks(req)
                    self.finalizing.remove(req)
                    self._store_session(req)
                continue  # otherwise: aborted while the step ran
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is not None:
                self._append_token(req, token)
                updated.append(req)
        return updated

    def _append_token(self, req: Request, token: int) -> None:
        req.append_output(token)
        status = self._stop_status(req, token)
        if status is not None:
            self.finish_request(req.request_id, status)

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        params = req.params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        previous = req.status
        req.status = status
        if previous == RequestStatus.RUNNING:
            self.running.remove(req)
        elif previous == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.remote[request_id]
            self.connector.abort_load(req)
        elif previous in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        if req.session_key and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            if req.num_computed_tokens < req.num_tokens:
                self.finalizing.append(req)
            else:
                self._store_session(req)
        elif self.connector.request_finished(req, self.kv.block_table(request_id)):
            self.sending[request_id] = req
        else:
            self.kv.free(req)
        return req

    # ---- remote KV -------------------------------------------------------------------
    def _poll_connector(self) -> None:
        finished = self.connector.get_finished()
        for rid in finished.sent:
            req = self.sending.pop(rid, None)
            if req is not None:
                self.kv.free(req)
        for rid, result in finished.loaded.items():
            req = self.remote.pop(rid, None)
            if req is None:
                continue
            req.num_computed_tokens = req.num_tokens
            self.kv.cache_full_blocks(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.remote_results.append((req, result))
            self._append_token(req, result.first_token_id)
        for rid, reason in finished.load_errors.items():
            req = self.remote.get(rid)
            if req is not None:
                req.extra["error"] = reason
                self.finish_request(rid, RequestStatus.FINISHED_ERROR)
                self.errored.append(req)
        for rid, reason in finished.load_failed.items():
            req = self.remote.pop(rid, None)
            if req is None:
                continue
            self.kv.free(req)
            req.num_computed_tokens = 0
            req.extra["no_remote"] = reason
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
