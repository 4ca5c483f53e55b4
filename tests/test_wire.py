"""KV wire encoding: exact round trips, fp8 error bounds, corrupt input, message splitting."""
from __future__ import annotations

import pytest
import torch

from pd._generated import prefill_pb2 as pb
from pd.transport.kv_frames import kv_chunk_message
from pd.transport.wire import (DTYPE_NAMES, decode_kv, decode_kv_into, dtype_from_name, dtype_name,
                               encode_kv, split_token_ranges)

SHAPE = (37, 3, 64)


def _kv(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_native_dtype_round_trip_is_bit_exact(dtype):
    t = _kv(dtype)
    data, scale = encode_kv(t, None)
    assert len(data) == t.numel() * t.element_size() and scale == 1.0
    out = decode_kv(data, dtype_name(dtype), scale, SHAPE, dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_bfloat16_bytes_are_the_raw_little_endian_bits():
    t = torch.tensor([[[1.0, -2.0]]], dtype=torch.bfloat16)
    data, _ = encode_kv(t, "")
    assert data == bytes([0x80, 0x3F, 0x00, 0xC0])  # 0x3f80, 0xc000 little-endian


def test_empty_wire_dtype_on_decode_means_kv_dtype():
    t = _kv(torch.bfloat16)
    data, scale = encode_kv(t, "")
    assert torch.equal(decode_kv(data, "", scale, SHAPE, torch.bfloat16), t)


def test_non_contiguous_input_round_trips():
    pool = _kv(torch.float32).repeat(1, 2, 1).view(37, 2, 3, 64)  # [slot, k/v, head, dim]
    keys = pool[:, 1]
    assert not keys.is_contiguous()
    data, scale = encode_kv(keys, None)
    assert torch.equal(decode_kv(data, "float32", scale, SHAPE, torch.float32), keys)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_round_trip_error_is_small_relative_to_amax(dtype):
    t = _kv(dtype, seed=1)
    data, scale = encode_kv(t, "float8_e4m3fn")
    amax = t.float().abs().max().item()
    assert len(data) == t.numel() and scale == pytest.approx(amax / 448, rel=1e-6)
    out = decode_kv(data, "float8_e4m3fn", scale, SHAPE, dtype)
    assert out.dtype == dtype
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 on normals, plus subnormal floor
    err = (out.float() - t.float()).abs()
    assert err.max().item() <= amax / 16
    assert err.mean().item() <= amax / 200


def test_fp8_of_all_zeros_uses_scale_one():
    t = torch.zeros(SHAPE, dtype=torch.bfloat16)
    data, scale = encode_kv(t, "float8_e4m3fn")
    assert scale == 1.0
    assert torch.equal(decode_kv(data, "float8_e4m3fn", scale, SHAPE, torch.bfloat16), t)


def test_fp8_keeps_amax_exactly_and_never_overflows_to_nan():
    t = torch.tensor([[[1000.0, -1000.0, 0.5, 3.0]]])
    data, scale = encode_kv(t, "float8_e4m3fn")
    out = decode_kv(data, "float8_e4m3fn", scale, (1, 1, 4), torch.float32)
    assert not out.isnan().any()
    assert out[0, 0, 0].item() == pytest.approx(1000.0, rel=1e-6)


def test_empty_chunks_round_trip_in_every_wire_dtype():
    t = torch.empty(0, 3, 64, dtype=torch.bfloat16)
    for wire in ("", "float8_e4m3fn", "float32"):
        data, scale = encode_kv(t, wire)
        assert data == b""
        assert decode_kv(data, wire, scale, (0, 3, 64), torch.bfloat16).shape == (0, 3, 64)


def test_fp8_refuses_non_finite_kv():
    t = torch.ones(SHAPE)
    t[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        encode_kv(t, "float8_e4m3fn")


def test_fp8_table_lookup_matches_torch_cast():
    t = _kv(torch.float32, seed=2)
    data, scale = encode_kv(t, "float8_e4m3fn")
    codes = torch.frombuffer(bytearray(data), dtype=torch.float8_e4m3fn).view(SHAPE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = (codes.float() * scale).to(dtype)
        assert torch.equal(decode_kv(data, "float8_e4m3fn", scale, SHAPE, dtype), expected)


def test_decode_into_pool_slots_writes_only_those_slots():
    t = _kv(torch.bfloat16)
    pool = torch.zeros(4, 2, 100, 3, 64, dtype=torch.bfloat16)  # [layer, k/v, slot, head, dim]
    data, scale = encode_kv(t, None)
    decode_kv_into(data, "bfloat16", scale, pool[2, 1, 10:47])
    assert torch.equal(pool[2, 1, 10:47], t)
    pool[2, 1, 10:47] = 0
    assert not pool.any()


@pytest.mark.parametrize("wire", ["", "float8_e4m3fn", "float16"])
def test_decode_into_a_strided_view_equals_decode(wire):
    t = _kv(torch.bfloat16, seed=3)
    data, scale = encode_kv(t, wire)
    out = torch.zeros(37, 2, 3, 64, dtype=torch.bfloat16)[:, 1]  # not contiguous
    decode_kv_into(data, wire, scale, out)
    assert torch.equal(out, decode_kv(data, wire, scale, SHAPE, torch.bfloat16))


def test_decode_into_checks_the_byte_count_against_the_destination():
    data, _ = encode_kv(_kv(torch.bfloat16), None)
    with pytest.raises(ValueError, match="corrupt KV chunk"):
        decode_kv_into(data, "bfloat16", 1.0, torch.empty(36, 3, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype,wire,layer,start,num_tokens", [
    (torch.bfloat16, "", 0, 0, 37),
    (torch.bfloat16, None, 29, 70000, 5),
    (torch.float32, "float8_e4m3fn", 3, 128, 37),
    (torch.float16, "float16", 1, 0, 0),
])
def test_kv_chunk_message_is_byte_identical_to_protobuf(dtype, wire, layer, start, num_tokens):
    kv = _kv(dtype, seed=4).repeat(1, 2, 1).view(37, 2, 3, 64)[:num_tokens]
    k, v = kv[:, 0], kv[:, 1]  # strided views, as cut from a pool
    k_data, k_scale = encode_kv(k, wire)
    v_data, v_scale = encode_kv(v, wire)
    expected = pb.PrefillMessage(kv=pb.KVChunk(
        layer=layer, start=start, num_tokens=num_tokens, wire_dtype=wire or dtype_name(dtype),
        k=k_data, v=v_data, k_scale=k_scale, v_scale=v_scale)).SerializeToString()
    assert kv_chunk_message(layer, start, k, v, wire) == expected


def test_kv_chunk_message_parses_back_to_the_kv():
    t = _kv(torch.bfloat16)
    msg = pb.PrefillMessage.FromString(kv_chunk_message(7, 16, t, t * 2, None))
    c = msg.kv
    assert (c.layer, c.start, c.num_tokens, c.wire_dtype) == (7, 16, 37, "bfloat16")
    assert torch.equal(decode_kv(c.v, c.wire_dtype, c.v_scale, SHAPE, torch.bfloat16), t * 2)


def test_wrong_byte_count_raises_corrupt_chunk():
    data, _ = encode_kv(_kv(torch.bfloat16), None)
    with pytest.raises(ValueError, match="corrupt KV chunk"):
        decode_kv(data[:-2], "bfloat16", 1.0, SHAPE, torch.bfloat16)
    with pytest.raises(ValueError, match="corrupt KV chunk"):
        decode_kv(data, "float8_e4m3fn", 1.0, SHAPE, torch.bfloat16)


def test_decoded_tensor_is_writable_and_owns_its_memory():
    data, _ = encode_kv(_kv(torch.float16), None)
    out = decode_kv(data, "float16", 1.0, SHAPE, torch.float16)
    out.zero_()
    assert decode_kv(data, "float16", 1.0, SHAPE, torch.float16).abs().sum() > 0


def test_dtype_names_round_trip_and_unknown_names_raise():
    for name, dtype in DTYPE_NAMES.items():
        assert dtype_from_name(name) == dtype and dtype_name(dtype) == name
    with pytest.raises(ValueError, match="unknown KV wire dtype"):
        dtype_from_name("int4")
    with pytest.raises(ValueError, match="cannot be sent"):
        dtype_name(torch.int64)


def test_encode_rejects_a_tensor_that_is_not_3d():
    with pytest.raises(ValueError, match="num_tokens, kv_heads, head_dim"):
        encode_kv(torch.zeros(4, 64), None)


def test_split_token_ranges_covers_the_range_within_the_byte_limit():
    ranges = split_token_ranges(start=100, num_tokens=1000, bytes_per_token=768,
                                max_message_bytes=1 << 20)
    assert ranges[0][0] == 100
    assert sum(n for _, n in ranges) == 1000
    assert all(s + n == s2 for (s, n), (s2, _) in zip(ranges, ranges[1:]))
    assert all(n * 768 <= 1 << 20 for _, n in ranges)
    assert ranges == [(100, 1000)]  # 1000 * 768 bytes fits in one MiB


def test_split_token_ranges_splits_exactly_at_the_limit():
    assert split_token_ranges(0, 10, 100, 300) == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert split_token_ranges(5, 0, 100, 300) == []


def test_split_token_ranges_sends_at_least_one_token_per_message():
    assert split_token_ranges(0, 3, 5000, 1000) == [(0, 1), (1, 1), (2, 1)]


def test_split_token_ranges_rejects_bad_sizes():
    with pytest.raises(ValueError):
        split_token_ranges(0, 10, 0, 100)
    with pytest.raises(ValueError):
        split_token_ranges(0, -1, 10, 100)
