"""KV tensors <-> bytes for the gRPC transport (the k / v fields of a KVChunk).

A chunk holds one layer's keys or values for a token range, [num_tokens, kv_heads,
head_dim], row-major and little-endian. It travels either in the KV cache dtype (raw
bytes, bit-exact) or as float8_e4m3fn with one scale per message (real = stored * scale).

The raw paths copy through numpy (one single-threaded memcpy per direction, even for
strided tensors): no torch kernel, so no OpenMP team to wake and no stall when the
engine's own threads hold the cores. Whole messages (framing, batching, reading in place)
are pd.transport.kv_frames'.
"""
from __future__ import annotations

import math
import sys

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


def wire_nbytes(t: torch.Tensor, wire_dtype: str | None) -> int:
    """Bytes that t's values take on the wire in wire_dtype ("" or None: t's own dtype)."""
    return t.numel() * (dtype_from_name(wire_dtype).itemsize if wire_dtype else t.element_size())


def wire_array(t: torch.Tensor, wire_dtype: str | None) -> tuple[np.ndarray, float]:
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
    data, scale = wire_array(t, wire_dtype)
    return data.tobytes(), scale


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
