"""Decode-side KV connector: sends long prefills to a prefill node and writes the KV back.

Scheduler side: a request whose uncached prompt suffix is long enough, while a healthy
prefill node has room, is claimed for remote prefill; once its blocks are allocated a
transfer thread streams the KV into them. Failures (timeouts, a dead or hung node, a
corrupt or short stream) are reported back as "recompute locally" or "fail", per policy.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
import numpy as np
import torch

from engine.kv_cache.kv_pool import KVPool
from engine.kv_connector import FinishedTransfers, KVConnector
from engine.request import Request
from pd._generated import prefill_pb2 as pb
from pd.decode.kv_stream import Deadlines
from pd.decode.prefill_peer import PrefillPeer, _describe
from pd.transport.fingerprint import engine_fingerprint, engine_kv_spec
from pd.transport.kv_copy import KVCopyPlan
from pd.transport.messages import done_to_result, sampling_to_pb
from pd.transport.kv_frames import KVChunkView, read_kv_message
from pd.transport.wire import decode_kv, dtype_name

logger = logging.getLogger("pd.decode.transfer")


@dataclass(frozen=True)
class PDPolicy:
    min_prompt_tokens: int = 128        # uncached suffix below this is prefilled locally
    failure: str = "recompute"          # or "fail"
    first_chunk_timeout_s: float = 10.0
    transfer_timeout_s: float = 120.0
    max_peer_waiting: int = 8           # a prefill node with this many queued is "full"
    wire_dtype: str = ""                # grpc transport: "" = KV dtype, "float8_e4m3fn"
    health_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.failure not in ("recompute", "fail"):
            raise ValueError(f"--pd-failure must be recompute or fail, got {self.failure!r}")


@dataclass
class Transfer:
    request_id: str
    peer: PrefillPeer
    token_ids: list[int]
    skip: int
    block_ids: list[int]
    message: pb.PrefillRequest
    wants_logprobs: bool
    cancelled: threading.Event = field(default_factory=threading.Event)
    call: object = None             # the KVStream carrying it
    timed_out: str | None = None    # "first-chunk" or "transfer", set by its deadlines
    awaiting_first: bool = True     # until its first message arrives
    copy_plan: tuple | None = None  # local transport: (chunk key, KVCopyPlan) of the last chunk
    slots: np.ndarray | None = None  # grpc transport: pool slot of each position
    slot_runs: tuple | None = None  # grpc transport: ((start, n), runs of consecutive slots)


class TransferFailed(Exception):
    def __init__(self, reason: str, peer_down: bool = False):
        super().__init__(reason)
        self.peer_down = peer_down


class _IdleStreamClosed(Exception):
    """A kept-open PrefillStream call ended before answering: it had died while idle."""


class DecodeConnector(KVConnector):
    def __init__(self, addresses: list[str], policy: PDPolicy, max_workers: int = 16):
        self.addresses = addresses
        self.peers: list[PrefillPeer] = []
        self.policy = policy
        self.metrics = None
        self.pool: KVPool | None = None
        self.block_tables: dict[str, list[int]] = {}
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="kv-transfer")
        self._lock = threading.Lock()
        self._active: dict[str, Transfer] = {}
        self._claimed: dict[str, PrefillPeer] = {}
        self._finished = FinishedTransfers()
        self._stop = threading.Event()
        self._rr = 0
        self._deadlines = Deadlines("pd-transfer-deadlines")
        self._health = threading.Thread(target=self._health_loop, name="pd-health", daemon=True)

    def register_kv_pool(self, pool: KVPool, block_tables: dict[str, list[int]]) -> None:
        self.pool = pool
        self.block_tables = block_tables
        lay = pool.layout
        # grpc transport, KV in the pool dtype on a CPU pool: messages are copied straight
        # into these per-layer (k rows, v rows) views of the pool, one row per slot
        self._raw_wire = dtype_name(lay.dtype) if pool.data.device.type == "cpu" else None
        self._row_bytes = lay.num_kv_heads * lay.head_dim * lay.itemsize
        self._layer_rows = [(_rows(layer[0]), _rows(layer[1])) for layer in pool.data] if self._raw_wire else []

    def attach(self, llm, transport: str, connect_timeout_s: float, metrics=None) -> None:
        """Binds the connector to its engine: the fingerprint it offers peers, and metrics."""
        fp, spec = engine_fingerprint(llm), engine_kv_spec(llm)
        self._fingerprint, self._kv_spec = fp, spec
        self._transport, self._connect_timeout_s = transport, connect_timeout_s
        self.peers = [PrefillPeer(a, fp, spec, transport, connect_timeout_s) for a in self.addresses]
        self.metrics = metrics

    def start(self) -> None:
        """Connects to the prefill nodes (after the engine exists) and starts health checks."""
        for peer in self.peers:
            peer.connect(self.pool.layout)
        self._health.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        suffix = request.num_tokens - num_computed_tokens
        named = request.extra.get("prefill_node")
        if named == "none" or suffix < self.policy.min_prompt_tokens:
            return 0
        peer = self._named_peer(named) if named else None
        if peer is None and not self.peers:
            return 0
        peer = peer or self._pick_peer()
        if peer is None:
            if not request.extra.get("pd_fallback_logged"):
                request.extra["pd_fallback_logged"] = True
                self._fallback(request.request_id, "no healthy prefill node with room", count_failure=False)
            return 0
        self._claimed[request.request_id] = peer
        return suffix

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        peer = self._claimed.pop(request.request_id)
        skip = request.num_tokens - num_external_tokens
        p = request.params
        msg = pb.PrefillRequest(request_id=request.request_id, token_ids=request.all_token_ids,
                                sampling=sampling_to_pb(p), transport=peer.transport or "grpc", skip_tokens=skip,
                                wire_dtype=self.policy.wire_dtype if peer.transport == "grpc" else "")
        t = Transfer(request.request_id, peer, list(request.all_token_ids), skip, list(block_ids), msg,
                     p.logprobs is not None)
        with self._lock:
            self._active[t.request_id] = t
            peer.num_inflight += 1
        self._executor.submit(self._run, t)

    def abort_load(self, request: Request) -> None:
        with self._lock:
            t = self._active.get(request.request_id)
        if t is not None:
            t.cancelled.set()
            if t.call is not None:
                t.call.cancel(owner=t)

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        self._claimed.pop(request.request_id, None)
        with self._lock:
            return request.request_id in self._active  # still writing: free when it stops

    def get_finished(self) -> FinishedTransfers:
        with self._lock:
            done, self._finished = self._finished, FinishedTransfers()
        return done

    def describe(self) -> dict:
        return {"kind": "decode", "peers": [{"address": p.address, "healthy": p.healthy,
                                             "transport": p.transport} for p in self.peers]}

    def _named_peer(self, address: str) -> PrefillPeer | None:
        """The prefill node a router chose, connected on first use (in the background)."""
        with self._lock:
            peer = next((p for p in self.peers if p.address == address), None)
            if peer is None:
                peer = PrefillPeer(address, self._fingerprint, self._kv_spec, self._transport,
                                   self._connect_timeout_s)
                self.peers.append(peer)
                threading.Thread(target=peer.connect, args=(self.pool.layout,), daemon=True).start()
        usable = peer.healthy and peer.stub is not None and not peer.is_overloaded(self.policy.max_peer_waiting)
        return peer if usable else None

    def _pick_peer(self) -> PrefillPeer | None:
        usable = [p for p in self.peers if p.healthy and p.stub is not None
                  and not p.is_overloaded(self.policy.max_peer_waiting)]
        if not usable:
            return None
        self._rr += 1
        return min(usable, key=lambda p: (p.num_inflight + p.load.num_waiting, (self._rr + id(p)) % 7))

    # ---- transfer thread ---------------------------------------------------------------------
    def _run(self, t: Transfer) -> None:
        t0 = time.monotonic()
        try:
            result, nbytes = self._stream(t)
        except TransferFailed as exc:
            if exc.peer_down:
                t.peer.mark_down(str(exc))
            self._finish(t, failure=str(exc))
        except Exception as exc:  # a bug must not leave the request waiting forever
            logger.exception("transfer %s crashed", t.request_id)
            self._finish(t, failure=f"internal error: {exc}")
        else:
            ms = (time.monotonic() - t0) * 1e3
            n = len(t.token_ids) - t.skip
            logger.info("transfer %s: %d tokens, %.2f MB, %.1f ms, %.1f MB/s, transport %s (prefill node %s, "
                        "%d tokens cached there)", t.request_id, n, nbytes / 1e6, ms,
                        nbytes / 1e6 / max(ms / 1e3, 1e-9), t.peer.transport, t.peer.address,
                        result.num_remote_cached_tokens)
            if self.metrics is not None:
                self.metrics.transfer_done(t.peer.transport, n, nbytes, ms / 1e3)
            self._finish(t, result=result)

    def _finish(self, t: Transfer, result=None, failure: str | None = None) -> None:
        with self._lock:
            self._active.pop(t.request_id, None)
            t.peer.num_inflight -= 1
            if t.cancelled.is_set():
                self._finished.sent.add(t.request_id)
            elif result is not None:
                self._finished.loaded[t.request_id] = result
            elif self.policy.failure == "fail":
                self._finished.load_errors[t.request_id] = f"remote prefill failed: {failure}"
            else:
                self._finished.load_failed[t.request_id] = failure
        if failure is not None and not t.cancelled.is_set():
            self._fallback(t.request_id, failure)

    def _fallback(self, request_id: str, reason: str, count_failure: bool = True) -> None:
        action = "failing the request" if self.policy.failure == "fail" and count_failure else "prefilling locally"
        logger.info("fallback %s: %s; %s", request_id, reason, action)
        if self.metrics is not None:
            self.metrics.fallback(reason, count_failure)

    def _stream(self, t: Transfer):
        ref = weakref.ref(t)  # a finished transfer is not kept until its deadlines pass
        self._deadlines.call_later(self.policy.first_chunk_timeout_s, _time_out, ref, "first-chunk")
        self._deadlines.call_later(self.policy.transfer_timeout_s, _time_out, ref, "transfer")
        try:
            return self._stream_once(t, fresh=False)
        except _IdleStreamClosed as exc:
            # a kept-open call that died while idle (the node restarted, a proxy closed it)
            # and never answered: the transfer goes again, once, on a new call
            logger.info("KV stream to %s was closed while idle (%s); retrying %s on a new one",
                        t.peer.address, exc, t.request_id)
            return self._stream_once(t, fresh=True)

    def _stream_once(self, t: Transfer, fresh: bool):
        peer, local_pool = t.peer, t.peer.local_pool
        stream = peer.start_transfer(t.message, owner=t, fresh=fresh)
        if stream is None:
            raise TransferFailed("prefill node disconnected", peer_down=True)
        t.call = stream
        if t.cancelled.is_set():
            stream.cancel(owner=t)
        nbytes, first, count, complete = 0, True, 0, False
        try:
            for data in stream:
                if first:
                    t.awaiting_first = first = False
                try:
                    chunks = read_kv_message(data)  # KV is read in place, without a protobuf copy
                    msg = pb.PrefillMessage.FromString(data) if chunks is None else None
                except (ValueError, DecodeError) as exc:
                    raise TransferFailed(f"corrupt message in the KV stream: {exc}") from None
                kind = "kv" if chunks is not None else msg.WhichOneof("payload")
                if kind == "kv":
                    for chunk in chunks:
                        nbytes += self._write_kv(t, chunk)
                elif kind == "local":
                    nbytes += self._copy_local(t, msg.local, local_pool)
                elif kind == "done":
                    if msg.done.num_kv_messages != count:
                        raise TransferFailed(f"short KV stream: {count} of {msg.done.num_kv_messages} messages")
                    result = self._done(t, msg.done)
                    complete = True
                    return result, nbytes
                count += 1
        except grpc.RpcError as exc:
            if t.cancelled.is_set():
                raise TransferFailed("aborted") from None
            if first and stream.reused and t.timed_out is None:
                raise _IdleStreamClosed(_describe(exc)) from None
            if t.timed_out == "first-chunk":
                raise TransferFailed(f"no KV within {self.policy.first_chunk_timeout_s:.0f} s (first-chunk "
                                     "timeout)", peer_down=True) from None
            code = exc.code() if hasattr(exc, "code") else None
            if t.timed_out == "transfer" or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TransferFailed(f"transfer exceeded {self.policy.transfer_timeout_s:.0f} s",
                                     peer_down=True) from None
            down = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
            raise TransferFailed(_describe(exc), peer_down=down) from None
        finally:
            peer.end_transfer(stream, complete)  # reused when complete, else cancelled
        if first and stream.reused and not t.cancelled.is_set():
            raise _IdleStreamClosed("the call had ended")
        raise TransferFailed("the KV stream ended before its last message (short stream)", peer_down=False)

    def _check_range(self, t: Transfer, layer: int, start: int, n: int) -> None:
        lay = self.pool.layout
        if layer >= lay.num_layers or n <= 0 or start < t.skip or start + n > len(t.token_ids):
            raise TransferFailed(f"corrupt KV message: layer {layer}, positions [{start}, {start + n}) outside "
                                 f"[{t.skip}, {len(t.token_ids)})")

    def _slots(self, t: Transfer, start: int, n: int) -> np.ndarray:
        """Pool slots of positions [start, start + n) of the transfer (numpy on purpose:
        small torch ops here would wake torch's OpenMP team, whose spinning threads then
        take the cores from gRPC's own threads)."""
        if t.slots is None:
            bs = self.pool.layout.block_size
            pos = np.arange(len(t.token_ids))
            t.slots = np.asarray(t.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs
        return t.slots[start:start + n]

    def _slot_runs(self, t: Transfer, start: int, n: int) -> list[tuple[int, int, int]]:
        """(first row, first slot, rows) runs of positions [start, start + n) whose pool
        slots are consecutive; every layer of a chunk shares them (cached on the transfer)."""
        if t.slot_runs is None or t.slot_runs[0] != (start, n):
            slots = self._slots(t, start, n)
            firsts = np.concatenate([[0], np.flatnonzero(slots[1:] != slots[:-1] + 1) + 1])
            lengths = np.diff(np.append(firsts, n))
            t.slot_runs = (start, n), list(zip(firsts.tolist(), slots[firsts].tolist(), lengths.tolist()))
        return t.slot_runs[1]

    def _write_kv(self, t: Transfer, chunk: KVChunkView) -> int:
        self._check_range(t, chunk.layer, chunk.start, chunk.num_tokens)
        if t.cancelled.is_set():
            raise TransferFailed("aborted")
        n = chunk.num_tokens
        if chunk.wire_dtype == self._raw_wire:
            # raw bytes of the pool dtype: rows go straight from the message into runs of
            # consecutive slots (one copy per run, single-threaded numpy: no OpenMP team to
            # wake per message)
            row = self._row_bytes
            if len(chunk.k) != n * row or len(chunk.v) != n * row:
                raise TransferFailed(f"corrupt KV chunk: {len(chunk.k)}/{len(chunk.v)} bytes for {n} tokens")
            runs = self._slot_runs(t, chunk.start, n)
            k_rows, v_rows = self._layer_rows[chunk.layer]
            for dst, data in ((k_rows, chunk.k), (v_rows, chunk.v)):
                src = np.frombuffer(data, dtype=np.uint8).reshape(n, row)
                for first, slot, length in runs:
                    dst[slot:slot + length] = src[first:first + length]
        else:
            lay, layer = self.pool.layout, self.pool.data[chunk.layer]
            slots = torch.from_numpy(self._slots(t, chunk.start, n).copy())
            shape = (n, lay.num_kv_heads, lay.head_dim)
            try:
                k = decode_kv(chunk.k, chunk.wire_dtype, chunk.k_scale, shape, lay.dtype)
                v = decode_kv(chunk.v, chunk.wire_dtype, chunk.v_scale, shape, lay.dtype)
            except ValueError as exc:
                raise TransferFailed(str(exc)) from None
            slots = slots.to(layer.device)
            layer[0].index_copy_(0, slots, k.to(layer.device))
            layer[1].index_copy_(0, slots, v.to(layer.device))
        return len(chunk.k) + len(chunk.v)

    def _copy_local(self, t: Transfer, chunk: pb.LocalChunk, src_pool: torch.Tensor | None) -> int:
        if src_pool is None:
            raise TransferFailed("local KV message but no shared pool is mapped", peer_down=True)
        self._check_range(t, chunk.layer, chunk.start, chunk.num_tokens)
        if t.cancelled.is_set():
            raise TransferFailed("aborted")
        bs = self.pool.layout.block_size
        key = (chunk.start, chunk.num_tokens, tuple(chunk.block_ids))
        if t.copy_plan is None or t.copy_plan[0] != key:  # every layer of a chunk shares one plan
            try:
                plan = KVCopyPlan(chunk.block_ids, t.block_ids, chunk.start, chunk.num_tokens, bs,
                                  src_num_blocks=src_pool.shape[2] // bs, dst_num_blocks=self.pool.data.shape[2] // bs)
            except ValueError as exc:
                raise TransferFailed(f"corrupt local KV message: {exc}") from None
            t.copy_plan = key, plan
        t.copy_plan[1].copy_layer(src_pool[chunk.layer], self.pool.data[chunk.layer])
        return 2 * chunk.num_tokens * self.pool.layout.num_kv_heads * self.pool.layout.head_dim * \
            self.pool.layout.itemsize

    def _done(self, t: Transfer, done: pb.PrefillDone):
        if done.num_tokens != len(t.token_ids):
            raise TransferFailed(f"corrupt final message: {done.num_tokens} tokens, expected {len(t.token_ids)}")
        if t.peer.transport == "local" and done.lease_id:
            try:
                t.peer.stub.Release(pb.ReleaseRequest(lease_id=done.lease_id), timeout=2.0)
            except grpc.RpcError as exc:  # the lease will expire on its own
                logger.warning("could not release lease %d on %s: %s", done.lease_id, t.peer.address,
                               _describe(exc))
        return done_to_result(done, t.wants_logprobs)

    # ---- health ------------------------------------------------------------------------
    def _health_loop(self) -> None:
        while not self._stop.wait(self.policy.health_interval_s):
            for peer in list(self.peers):
                try:
                    peer.check(self.pool.layout)
                except Exception:  # keep probing whatever happens
                    logger.exception("health probe of %s failed", peer.address)


def _time_out(ref: weakref.ref, which: str) -> None:
    """A transfer's deadline passed: cancel its stream unless it has moved on (its first
    message came, or it finished and the stream serves another transfer)."""
    t = ref()
    if t is None or (which == "first-chunk" and not t.awaiting_first):
        return
    if t.timed_out is None and t.call is not None and t.call.owner is t:
        t.timed_out = which
        t.call.cancel(owner=t)


def _rows(t: torch.Tensor) -> np.ndarray:
    """[slots, kv_heads, head_dim] CPU tensor as a writable uint8 array of one row per slot."""
    return t.view(torch.uint8).reshape(t.shape[0], -1).numpy()
