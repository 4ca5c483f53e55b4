"""Kept-open PrefillStream calls (pd.decode.kv_stream) against a real gRPC server."""
from __future__ import annotations

import threading
import time
import grpc
import pytest

from grpc_utils import serve_prefill_stream, stream_peer
from pd._generated import prefill_pb2 as pb
from pd.decode.kv_stream import MAX_IDLE_STREAMS, Deadlines, StreamPool


def _done(num_tokens: int) -> bytes:
    return pb.PrefillMessage(done=pb.PrefillDone(num_tokens=num_tokens)).SerializeToString()


@pytest.fixture()
def server():
    """A PrefillStream server answering each request with one Done carrying its token
    count; it records how many calls it saw and which of them ended (cancelled or not)."""
    state = {"calls": 0, "ended": []}

    def prefill_stream(requests, context):
        state["calls"] += 1
        call = state["calls"]
        context.add_callback(lambda: state["ended"].append(call))
        for request in requests:
            yield _done(len(request.token_ids))

    srv, channel, port = serve_prefill_stream(prefill_stream, MAX_IDLE_STREAMS + 4)
    yield channel, state, port
    channel.close()
    srv.stop(None)


def _transfer(pool: StreamPool, channel, n: int, reusable: bool = True):
    stream = pool.acquire(channel, pb.PrefillRequest(token_ids=range(n)), owner=object())
    reply = pb.PrefillMessage.FromString(next(iter(stream)))
    pool.release(stream, reusable)
    return stream, reply.done.num_tokens


def test_one_call_carries_transfer_after_transfer(server):
    channel, state, _ = server
    pool = StreamPool()
    streams = {_transfer(pool, channel, n)[0] for n in (3, 5, 7)}
    assert len(streams) == 1 and state["calls"] == 1 and pool.num_idle == 1
    assert [_transfer(pool, channel, n)[1] for n in (11, 13)] == [11, 13]  # answers stay in order
    pool.close()
    wait = time.monotonic() + 5
    while state["ended"] != [1] and time.monotonic() < wait:
        time.sleep(0.01)
    assert state["ended"] == [1]  # close() ends the idle call on the server too


def test_an_incomplete_transfer_is_never_reused(server):
    channel, state, _ = server
    pool = StreamPool()
    first, _ = _transfer(pool, channel, 4, reusable=False)  # e.g. a timeout or a corrupt message
    assert first.cancelled and pool.num_idle == 0
    second, n = _transfer(pool, channel, 6)
    assert second is not first and n == 6 and state["calls"] == 2
    pool.close()


def test_concurrent_transfers_get_their_own_calls_and_idle_calls_are_capped(server):
    channel, state, _ = server
    pool = StreamPool()
    n = MAX_IDLE_STREAMS + 2
    streams = [pool.acquire(channel, pb.PrefillRequest(token_ids=range(i + 1)), owner=i) for i in range(n)]
    assert [pb.PrefillMessage.FromString(next(iter(s))).done.num_tokens for s in streams] == list(range(1, n + 1))
    for s in streams:
        pool.release(s, reusable=True)
    assert state["calls"] == n and pool.num_idle == MAX_IDLE_STREAMS
    assert sum(s.cancelled for s in streams) == n - MAX_IDLE_STREAMS
    pool.close()


def test_streams_of_an_old_channel_are_not_reused(server):
    channel, state, port = server
    pool = StreamPool()
    old, _ = _transfer(pool, channel, 2)
    reconnected = grpc.insecure_channel(f"127.0.0.1:{port}")  # as PrefillPeer.connect() makes after a restart
    try:
        new, n = _transfer(pool, reconnected, 3)
        assert new is not old and old.cancelled and n == 3 and state["calls"] == 2
    finally:
        pool.close()
        reconnected.close()


def test_cancel_with_an_owner_only_cancels_that_owners_transfer(server):
    channel, _, _ = server
    pool = StreamPool()
    first_owner, second_owner = object(), object()
    stream = pool.acquire(channel, pb.PrefillRequest(token_ids=[1]), owner=first_owner)
    next(iter(stream))
    pool.release(stream, reusable=True)
    again = pool.acquire(channel, pb.PrefillRequest(token_ids=[1, 2]), owner=second_owner)
    assert again is stream
    stream.cancel(owner=first_owner)  # a late timeout of the finished transfer: ignored
    assert not stream.cancelled
    assert pb.PrefillMessage.FromString(next(iter(stream))).done.num_tokens == 2
    stream.cancel(owner=second_owner)
    assert stream.cancelled
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stream))
    assert info.value.code() == grpc.StatusCode.CANCELLED
    pool.close()


def test_deadlines_fire_in_order_from_one_thread():
    deadlines = Deadlines("test-deadlines")
    fired, done = [], threading.Event()
    start = time.monotonic()
    for delay, name in ((0.15, "c"), (0.05, "a"), (0.1, "b")):
        deadlines.call_later(delay, lambda n: (fired.append((n, time.monotonic() - start)), n == "c" and done.set()),
                             name)
    deadlines.call_later(0.0, lambda: 1 / 0)  # a failing callback does not stop the others
    assert done.wait(5)
    assert [n for n, _ in fired] == ["a", "b", "c"]
    assert all(at >= delay for (_, at), delay in zip(fired, (0.05, 0.1, 0.15)))


def test_a_kept_open_call_that_died_while_idle_is_retried_once_on_a_new_call():
    """A server that ends each call after one answer (as a restarted node or a proxy's idle
    timeout would): the next transfer finds its kept-open call dead, goes again on a new
    call and succeeds; with the server gone, the retry fails as a normal transfer failure."""
    import torch

    from engine.kv_cache.kv_pool import KVLayout, KVPool
    from pd.decode.pd_connector import DecodeConnector, PDPolicy, Transfer, TransferFailed

    calls = []

    def one_answer_per_call(requests, context):
        calls.append(context)
        request = next(requests)
        yield pb.PrefillMessage(done=pb.PrefillDone(first_token_id=7, num_tokens=len(request.token_ids))
                                ).SerializeToString()

    srv, channel, _ = serve_prefill_stream(one_answer_per_call)
    pool = StreamPool()
    peer = stream_peer(pool, channel)
    connector = DecodeConnector([], PDPolicy(first_chunk_timeout_s=5, transfer_timeout_s=5))
    connector.register_kv_pool(KVPool(KVLayout(1, 4, 16, 1, 8, torch.float32)), {})

    def transfer():
        t = Transfer("req", peer, list(range(4)), 0, [0], pb.PrefillRequest(token_ids=range(4)), False)
        return connector._stream(t)

    try:
        for expected_calls in (1, 2, 3):
            result, nbytes = transfer()
            assert result.first_token_id == 7 and nbytes == 0 and len(calls) == expected_calls
        srv.stop(None)
        with pytest.raises(TransferFailed):
            transfer()
    finally:
        pool.close()
        channel.close()
        srv.stop(None)
