"""Serialized KV messages: PrefillMessage{kv: KVChunk} and {kv_batch: KVBatch} built from
tensors with one copy of the KV, and read back in place (the KV as memoryviews of the
received bytes). The bytes are exactly what protobuf makes of the same fields, so either
side may use the generated classes instead; these exist to skip protobuf's copies of
MiB-sized byte fields. Tensor <-> bytes conversion is pd.transport.wire's.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from pd.transport.wire import dtype_name, split_token_ranges, wire_array, wire_nbytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, value: int) -> bytes:
    return bytes([tag]) + _varint(value)


def _kv_chunk_parts(layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                    wire_dtype: str | None) -> tuple[list[bytes | np.ndarray], int]:
    """The fields of a serialized KVChunk (no copy of the KV where it needs no conversion)
    and their total size."""
    if k.shape != v.shape:
        raise ValueError(f"keys and values differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")
    (k_data, k_scale), (v_data, v_scale) = wire_array(k, wire_dtype), wire_array(v, wire_dtype)
    name = (wire_dtype or dtype_name(k.dtype)).encode()
    # proto3 leaves out fields that hold their default (0, "", empty bytes, 0.0)
    parts: list[bytes | np.ndarray] = [_field(tag, value) for tag, value in
                                       ((0x08, layer), (0x10, start), (0x18, k.shape[0])) if value]
    parts += [_field(0x22, len(name)), name]
    for tag, data in ((0x2A, k_data), (0x32, v_data)):
        if data.nbytes:
            parts += [_field(tag, data.nbytes), data]
    for tag, scale in ((0x3D, k_scale), (0x45, v_scale)):
        if scale:
            parts.append(bytes([tag]) + struct.pack("<f", scale))
    return parts, sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in parts)


def kv_chunk_message(layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                     wire_dtype: str | None) -> bytes:
    """A serialized PrefillMessage{kv: KVChunk} carrying k and v ([n, kv_heads, head_dim]).

    The same bytes as PrefillMessage(kv=KVChunk(layer, start, n, wire name, encode_kv(k),
    encode_kv(v), scales)).SerializeToString(), built with one copy of the KV instead of
    three. Send it through a handler whose response_serializer passes bytes through.
    """
    parts, size = _kv_chunk_parts(layer, start, k, v, wire_dtype)
    return b"".join([_field(0x0A, size), *parts])


def kv_batch_message(pieces: list[tuple[int, int, torch.Tensor, torch.Tensor]], wire_dtype: str | None) -> bytes:
    """A serialized PrefillMessage{kv_batch: KVBatch} of one KVChunk per (layer, start, k, v)
    piece, in order; one copy of the KV, like kv_chunk_message."""
    body: list[bytes | np.ndarray] = []
    for layer, start, k, v in pieces:
        parts, size = _kv_chunk_parts(layer, start, k, v, wire_dtype)
        body += [_field(0x0A, size), *parts]  # KVBatch.chunks = 1
    size = sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in body)
    return b"".join([_field(0x22, size), *body])  # PrefillMessage.kv_batch = 4


def kv_messages(pieces: Iterable[tuple[int, int, torch.Tensor, torch.Tensor]], wire_dtype: str | None,
                max_message_bytes: int) -> Iterator[bytes]:
    """Serialized PrefillMessages carrying these (layer, start, k, v) pieces in order: a
    piece larger than max_message_bytes is cut by token range, consecutive small ones are
    packed into KVBatch messages of up to max_message_bytes (so a short prompt does not
    cost one message per layer). Lazy: each message is built when it is asked for."""
    batch: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    batch_bytes = 0
    for layer, start, k, v in pieces:
        per_token = max(2 * wire_nbytes(k[:1], wire_dtype), 1)
        for s, n in split_token_ranges(start, k.shape[0], per_token, max_message_bytes):
            if batch and batch_bytes + n * per_token > max_message_bytes:
                yield _one_message(batch, wire_dtype)
                batch, batch_bytes = [], 0
            batch.append((layer, s, k[s - start:s - start + n], v[s - start:s - start + n]))
            batch_bytes += n * per_token
    if batch:
        yield _one_message(batch, wire_dtype)


def _one_message(batch: list[tuple[int, int, torch.Tensor, torch.Tensor]], wire_dtype: str | None) -> bytes:
    return kv_chunk_message(*batch[0], wire_dtype) if len(batch) == 1 else kv_batch_message(batch, wire_dtype)


class KVChunkView(NamedTuple):
    """A KVChunk read in place from a received message: k and v view its bytes."""
    layer: int
    start: int
    num_tokens: int
    wire_dtype: str
    k: memoryview
    v: memoryview
    k_scale: float
    v_scale: float


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("corrupt KV message: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of a serialized message; LEN values are views.
    (Tags and lengths under 128 take the one-byte path: this runs once per field of
    every KV message on the decode node's receive thread.)"""
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            if pos < end and buf[pos] < 0x80:
                value, pos = buf[pos], pos + 1
            else:
                value, pos = _read_varint(buf, pos)
        elif kind == 2:
            if pos < end and buf[pos] < 0x80:
                size, pos = buf[pos], pos + 1
            else:
                size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise ValueError("corrupt KV message: a field runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            if pos + width > end:
                raise ValueError("corrupt KV message: truncated fixed-width field")
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise ValueError(f"corrupt KV message: wire type {kind}")
        yield number, kind, value


_WIRE_TYPES = {1: 0, 2: 0, 3: 0, 4: 2, 5: 2, 6: 2, 7: 5, 8: 5}  # KVChunk field number: wire type


def _chunk_view(buf: memoryview) -> KVChunkView:
    ints, wire_dtype, k, v, k_scale, v_scale = [0, 0, 0], "", buf[:0], buf[:0], 0.0, 0.0
    for number, kind, value in _fields(buf):
        expected = _WIRE_TYPES.get(number)
        if expected is None:
            continue  # a field from a newer peer
        if kind != expected:
            name = KVChunkView._fields[number - 1]
            raise ValueError(f"corrupt KV message: field {name} has wire type {kind}")
        if kind == 0:  # layer, start, num_tokens: fields 1-3
            ints[number - 1] = value
        elif number == 5:
            k = value
        elif number == 6:
            v = value
        elif number == 4:
            wire_dtype = bytes(value).decode()
        elif number == 7:
            k_scale = struct.unpack("<f", value)[0]
        else:
            v_scale = struct.unpack("<f", value)[0]
    return KVChunkView(ints[0], ints[1], ints[2], wire_dtype, k, v, k_scale, v_scale)


def read_kv_message(data: bytes) -> list[KVChunkView] | None:
    """The KV chunks of a serialized PrefillMessage (kv or kv_batch), read in place
    without copying the KV; None when the message is something else (parse it with
    PrefillMessage.FromString). Raises ValueError on a malformed message."""
    buf = memoryview(data)
    chunks: list[KVChunkView] = []
    for number, kind, value in _fields(buf):
        if kind != 2 or number not in (1, 4):
            return None
        if number == 1:
            chunks.append(_chunk_view(value))
        else:
            chunks += [_chunk_view(c) for n, k, c in _fields(value) if n == 1 and k == 2]
    return chunks or None
