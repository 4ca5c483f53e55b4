"""KV tensors <-> bytes for the gRPC transport (the k / v fields of a KVChunk).

A chunk holds one layer's keys or values for a token range, [num_tokens, kv_heads,
head_dim], row-major and little-endian. It travels either in the KV cache dtype (raw
bytes, bit-exact) or as float8_e4m3fn with one scale per message (real = stored * scale).

The raw paths copy through numpy (one single-threaded memcpy per direction, even for
strided tensors): no torch kernel, so no OpenMP team to wake and no stall when the
engine's own threads hold the cores.
"""
from __future__ import annotations

import math
import struct
import sys
from typing import NamedTuple
from collections.abc import Iterable, Iterator

import numpy as np
import torch

FP8_NAME = "float8_e4m3fn"
FP8_MAX = 448.0

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    FP8_NAME: torch.float8_e4m3fn,
}
_NAMES_BY_DTYPE = {dtype: name for name, dtype in DTYPE_NAMES.items()}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # same-size types numpy understands
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()

if sys.byteorder != "little":
    raise ImportError("pd.transport.wire sends raw little-endian tensor bytes; "
                      "big-endian hosts are not supported")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown KV wire dtype {name!r}; use one of {sorted(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"KV dtype {dtype} cannot be sent; use one of {sorted(DTYPE_NAMES)}") from None


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's bits (same strides), as an integer type of t's item size."""
    return t.view(_BITS[t.element_size()]).numpy()


def _quantize_fp8(t: torch.Tensor) -> tuple[np.ndarray, float]:
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8), 1.0
    x = t.to(torch.float32, copy=True)
    amax = x.abs().amax()
    if not torch.isfinite(amax):
        raise ValueError("KV chunk holds inf or NaN and cannot be sent as float8_e4m3fn; "
                         "send it in the KV dtype (wire_dtype='')")
    scale = amax / FP8_MAX if amax > 0 else torch.ones((), dtype=torch.float32)
    q = x.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return _bits(q), float(scale)  # scale is a float32 value: exact in the proto float


def _payload(t: torch.Tensor, wire_dtype: str | None) -> tuple[np.ndarray, float]:
    """The wire form of t as a C-contiguous numpy array (a view where t is contiguous and
    needs no conversion) and its scale."""
    if t.dim() != 3:
        raise ValueError(f"KV chunk must be [num_tokens, kv_heads, head_dim], got shape {tuple(t.shape)}")
    dtype_name(t.dtype)  # validates the source dtype
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not wire_dtype or dtype_from_name(wire_dtype) == t.dtype:
        data, scale = _bits(t), 1.0
    elif wire_dtype == FP8_NAME:
        data, scale = _quantize_fp8(t)
    else:
        data, scale = _bits(t.to(dtype_from_name(wire_dtype))), 1.0
    return np.ascontiguousarray(data), scale


def encode_kv(t: torch.Tensor, wire_dtype: str | None) -> tuple[bytes, float]:
    """Serialize a [n, kv_heads, head_dim] KV tensor; returns (bytes, scale).

    wire_dtype None or "" sends t's own dtype bit for bit (scale 1.0); "float8_e4m3fn"
    quantizes with scale = amax / 448; another float dtype name converts to it.
    """
    data, scale = _payload(t, wire_dtype)
    return data.tobytes(), scale


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
    (k_data, k_scale), (v_data, v_scale) = _payload(k, wire_dtype), _payload(v, wire_dtype)
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
        itemsize = dtype_from_name(wire_dtype).itemsize if wire_dtype else k.element_size()
        per_token = max(2 * math.prod(k.shape[1:]) * itemsize, 1)
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
    """(field number, wire type, value) of a serialized message; LEN values are views."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos)
        elif kind == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("corrupt KV message: a field runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            if pos + width > len(buf):
                raise ValueError("corrupt KV message: truncated fixed-width field")
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise ValueError(f"corrupt KV message: wire type {kind}")
        yield number, kind, value


def _chunk_view(buf: memoryview) -> KVChunkView:
    f = {"layer": 0, "start": 0, "num_tokens": 0, "wire_dtype": "", "k": buf[:0], "v": buf[:0],
         "k_scale": 0.0, "v_scale": 0.0}
    names = {1: "layer", 2: "start", 3: "num_tokens", 4: "wire_dtype", 5: "k", 6: "v", 7: "k_scale", 8: "v_scale"}
    for number, kind, value in _fields(buf):
        name = names.get(number)
        if name is None:
            continue  # a field from a newer peer
        if name == "wire_dtype" and kind == 2:
            f[name] = bytes(value).decode()
        elif name in ("k", "v") and kind == 2:
            f[name] = value
        elif name.endswith("scale") and kind == 5:
            f[name] = struct.unpack("<f", value)[0]
        elif kind == 0 and name in ("layer", "start", "num_tokens"):
            f[name] = value
        else:
            raise ValueError(f"corrupt KV message: field {name} has wire type {kind}")
    return KVChunkView(**f)


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


def _check_length(data: bytes, shape: tuple[int, ...], wire: torch.dtype) -> None:
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        raise ValueError(f"corrupt KV chunk: {len(data)} bytes, expected {expected} for shape "
                         f"{tuple(shape)} in {dtype_name(wire)}; the peer is incompatible or the "
                         "stream broke")


def _fp8_table(scale: float, out_dtype: torch.dtype) -> np.ndarray:
    """The 256 fp8 codes dequantized to out_dtype, as bit patterns."""
    values = (_FP8_VALUES * torch.tensor(scale, dtype=torch.float32)).to(out_dtype)
    return _bits(values)


def decode_kv_into(data: bytes, wire_dtype: str, scale: float, out: torch.Tensor) -> None:
    """Decode a chunk straight into `out` (a [n, kv_heads, head_dim] CPU view, e.g. pool
    slots): one pass, no intermediate tensor when out holds the wire dtype or fp8 is
    dequantized. Raises ValueError when the byte count does not match out's shape."""
    wire = dtype_from_name(wire_dtype) if wire_dtype else out.dtype
    _check_length(data, out.shape, wire)
    if out.numel() == 0:
        return
    if out.device.type != "cpu":
        out.copy_(decode_kv(data, wire_dtype, scale, tuple(out.shape), out.dtype))
        return
    src = np.frombuffer(data, dtype=np.uint8)  # read-only view of the message bytes
    dst = _bits(out)
    if wire == torch.float8_e4m3fn:
        table = _fp8_table(scale, out.dtype)
        if dst.flags.c_contiguous:
            np.take(table, src.reshape(dst.shape), out=dst, mode="clip")
        else:
            dst[...] = table[src.reshape(dst.shape)]
    elif wire == out.dtype:
        dst[...] = src.view(dst.dtype).reshape(dst.shape)
    else:
        converted = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(wire).view(out.shape)
        out.copy_(converted)


def decode_kv(data: bytes, wire_dtype: str, scale: float, shape: tuple[int, int, int],
              out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of encode_kv: a new [n, kv_heads, head_dim] tensor of out_dtype.

    wire_dtype "" means the bytes are already in out_dtype. Raises ValueError when the
    byte count does not match the shape. Prefer decode_kv_into when the destination
    exists (it saves a copy).
    """
    out = torch.empty(shape, dtype=out_dtype)
    decode_kv_into(data, wire_dtype, scale, out)
    return out


def split_token_ranges(start: int, num_tokens: int, bytes_per_token: int,
                       max_message_bytes: int) -> list[tuple[int, int]]:
    """Cut [start, start + num_tokens) into (start, num_tokens) pieces of at most
    max_message_bytes each (at least one token per piece, however large a token is)."""
    if num_tokens < 0 or bytes_per_token <= 0 or max_message_bytes <= 0:
        raise ValueError(f"split_token_ranges needs num_tokens >= 0 and positive sizes, got "
                         f"num_tokens={num_tokens}, bytes_per_token={bytes_per_token}, "
                         f"max_message_bytes={max_message_bytes}")
    step = max(1, max_message_bytes // bytes_per_token)
    end = start + num_tokens
    return [(s, min(step, end - s)) for s in range(start, end, step)]
