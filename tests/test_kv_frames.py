"""KV message packing (kv_frames.kv_messages / KVBatch) and the in-place reader (read_kv_message)."""
from __future__ import annotations

import pytest
import torch

from pd._generated import prefill_pb2 as pb
from pd.transport.kv_frames import kv_batch_message, kv_messages, read_kv_message
from pd.transport.wire import FP8_NAME, decode_kv


def _kv(num_layers=4, num_tokens=10, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_layers, 2, num_tokens, heads, dim, generator=g).to(torch.bfloat16)


def _chunks(message: bytes) -> list:
    msg = pb.PrefillMessage.FromString(message)
    kind = msg.WhichOneof("payload")
    return [msg.kv] if kind == "kv" else list(msg.kv_batch.chunks)


@pytest.mark.parametrize("wire", ["", FP8_NAME, "float32"])
@pytest.mark.parametrize("max_bytes", [100, 700, 1 << 20])
def test_messages_cover_every_layer_and_token_once_within_the_size_limit(wire, max_bytes):
    kv = _kv()
    pieces = [(layer, 5, kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]
    messages = list(kv_messages(pieces, wire, max_bytes))
    out = torch.zeros_like(kv)
    seen = torch.zeros(kv.shape[0], kv.shape[2], dtype=torch.int32)
    for message in messages:
        chunks = _chunks(message)
        assert sum(len(c.k) + len(c.v) for c in chunks) <= max(max_bytes, len(chunks[0].k) * 2)
        for c in chunks:
            shape = (c.num_tokens, kv.shape[3], kv.shape[4])
            out[c.layer, 0, c.start - 5:c.start - 5 + c.num_tokens] = decode_kv(c.k, c.wire_dtype, c.k_scale, shape,
                                                                                 kv.dtype)
            out[c.layer, 1, c.start - 5:c.start - 5 + c.num_tokens] = decode_kv(c.v, c.wire_dtype, c.v_scale, shape,
                                                                                 kv.dtype)
            seen[c.layer, c.start - 5:c.start - 5 + c.num_tokens] += 1
    assert torch.equal(seen, torch.ones_like(seen))
    if wire != FP8_NAME:
        assert torch.equal(out, kv)
    if max_bytes == 1 << 20:
        assert len(messages) == 1 and pb.PrefillMessage.FromString(messages[0]).WhichOneof("payload") == "kv_batch"


def test_a_single_piece_is_a_plain_kv_message():
    kv = _kv(num_layers=1)
    (message,) = kv_messages([(0, 0, kv[0, 0], kv[0, 1])], "", 1 << 20)
    assert pb.PrefillMessage.FromString(message).WhichOneof("payload") == "kv"


def test_messages_are_built_lazily():
    kv = _kv()

    def pieces():
        yield 0, 0, kv[0, 0], kv[0, 1]
        raise RuntimeError("the second piece was asked for too early")

    stream = kv_messages(pieces(), "", 1)  # one token per message
    assert _chunks(next(stream))[0].num_tokens == 1
    with pytest.raises(RuntimeError):
        list(stream)


@pytest.mark.parametrize("wire", ["", FP8_NAME])
def test_read_kv_message_matches_protobuf(wire):
    kv = _kv()
    pieces = [(layer, 3, kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]
    for message in list(kv_messages(pieces, wire, 400)) + [kv_batch_message(pieces, wire)]:
        views, expected = read_kv_message(message), _chunks(message)
        assert len(views) == len(expected)
        for v, c in zip(views, expected):
            assert (v.layer, v.start, v.num_tokens, v.wire_dtype, v.k_scale, v.v_scale) == \
                (c.layer, c.start, c.num_tokens, c.wire_dtype, c.k_scale, c.v_scale)
            assert bytes(v.k) == c.k and bytes(v.v) == c.v
            assert isinstance(v.k, memoryview)  # read in place, not copied


def test_read_kv_message_leaves_other_messages_to_protobuf():
    done = pb.PrefillMessage(done=pb.PrefillDone(first_token_id=7, num_tokens=3)).SerializeToString()
    local = pb.PrefillMessage(local=pb.LocalChunk(layer=1, num_tokens=2, block_ids=[4])).SerializeToString()
    assert read_kv_message(done) is None and read_kv_message(local) is None


def test_read_kv_message_skips_unknown_chunk_fields():
    chunk = pb.KVChunk(layer=2, start=1, num_tokens=1, wire_dtype="bfloat16", k=b"ab", v=b"cd")
    extra = bytes([0x50, 0x05])  # field 10, varint 5: from a newer peer
    body = chunk.SerializeToString() + extra
    message = bytes([0x0A, len(body)]) + body
    (view,) = read_kv_message(message)
    assert (view.layer, bytes(view.k), bytes(view.v)) == (2, b"ab", b"cd")


@pytest.mark.parametrize("data", [
    bytes([0x0A, 0x05, 0x08]),            # the chunk runs past the end
    bytes([0x0A, 0x02, 0x08, 0x80]),      # truncated varint
    bytes([0x0A, 0x02, 0x2D, 0x01]),      # k with a fixed32 wire type
    bytes([0x0A, 0x01, 0x0B]),            # wire type 3 (groups)
])
def test_read_kv_message_rejects_malformed_bytes(data):
    with pytest.raises(ValueError, match="corrupt KV message"):
        read_kv_message(data)


def test_decode_connector_reads_a_batched_grpc_stream_into_its_pool():
    """Real PrefillStream calls of packed KV (KVBatch and split KVChunk messages) land in
    the decode node's pool slots, through the raw-bytes stream the decode node uses; the
    second and third transfers reuse the first one's call."""
    from engine.kv_cache.kv_pool import KVLayout, KVPool
    from grpc_utils import serve_prefill_stream, stream_peer
    from pd.decode.kv_stream import StreamPool
    from pd.decode.pd_connector import DecodeConnector, PDPolicy, Transfer

    layers, num_tokens, bs = 5, 40, 16
    kv = _kv(num_layers=layers, num_tokens=num_tokens, heads=2, dim=8, seed=3)
    sent, calls = [], []

    def prefill_stream(requests, context):
        calls.append(context)
        for _ in requests:
            count = 0
            pieces = [(layer, 0, kv[layer, 0], kv[layer, 1]) for layer in range(layers)]
            for message in kv_messages(pieces, "", 6000):  # 2560 bytes a layer: two KVBatch, one KVChunk
                sent.append(pb.PrefillMessage.FromString(message).WhichOneof("payload"))
                count += 1
                yield message
            yield pb.PrefillMessage(done=pb.PrefillDone(first_token_id=5, num_tokens=num_tokens,
                                                        num_kv_messages=count)).SerializeToString()

    server, channel, _ = serve_prefill_stream(prefill_stream, max_workers=2)
    streams = StreamPool()
    try:
        pool = KVPool(KVLayout(layers, 8, bs, 2, 8, torch.bfloat16))
        connector = DecodeConnector([], PDPolicy())
        peer = stream_peer(streams, channel)
        for block_ids in ([6, 1, 3], [0, 2, 7], [5, 4, 1]):
            pool.data.zero_()
            connector.register_kv_pool(pool, {"req-0": block_ids})
            t = Transfer("req-0", peer, list(range(num_tokens)), 0, block_ids, pb.PrefillRequest(), False)
            result, nbytes = connector._stream(t)
            assert result.first_token_id == 5 and nbytes == kv.numel() * kv.element_size()
            pos = torch.arange(num_tokens)
            slots = torch.tensor(block_ids)[pos // bs] * bs + pos % bs
            assert torch.equal(pool.data[:, :, slots], kv)
        assert len(calls) == 1 and streams.num_idle == 1  # one call carried all three transfers
    finally:
        streams.close()
        channel.close()
        server.stop(None)

