"""KV tensors <-> bytes for the gRPC transport (the k / v fields of a KVChunk).

A chunk holds one layer's keys or values for a token range, [num_tokens, kv_heads,
head_dim], row-major and little-endian. It travels either in the KV cache dtype (raw
bytes, bit-exact) or as float8_e4m3fn with one scale per message (real = stored * scale).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

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


def _raw_bytes(t: torch.Tensor) -> bytes:
    # one copy for a contiguous tensor: the uint8 view shares memory, tobytes() copies it
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _quantize_fp8(t: torch.Tensor) -> tuple[bytes, float]:
    x = t.to(torch.float32, copy=True)
    amax = x.abs().amax()
    if not torch.isfinite(amax):
        raise ValueError("KV chunk holds inf or NaN and cannot be sent as float8_e4m3fn; "
                         "send it in the KV dtype (wire_dtype='')")
    scale = amax / FP8_MAX if amax > 0 else torch.ones((), dtype=torch.float32)
    q = x.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return _raw_bytes(q), float(scale)  # scale is a float32 value: exact in the proto float


_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _dequantize_fp8(codes: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    # a 256-entry table lookup is ~5x faster on CPU than torch's fp8 -> float cast
    table = (_FP8_VALUES * torch.tensor(scale, dtype=torch.float32)).to(out_dtype)
    return table.index_select(0, codes.flatten().int()).view(codes.shape)


def encode_kv(t: torch.Tensor, wire_dtype: str | None) -> tuple[bytes, float]:
    """Serialize a [n, kv_heads, head_dim] KV tensor; returns (bytes, scale).

    wire_dtype None or "" sends t's own dtype bit for bit (scale 1.0); "float8_e4m3fn"
    quantizes with scale = amax / 448; another float dtype name converts to it.
    """
    if t.dim() != 3:
        raise ValueError(f"KV chunk must be [num_tokens, kv_heads, head_dim], got shape {tuple(t.shape)}")
    dtype_name(t.dtype)  # validates the source dtype
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not wire_dtype or dtype_from_name(wire_dtype) == t.dtype:
        return _raw_bytes(t), 1.0
    if wire_dtype == FP8_NAME:
        return _quantize_fp8(t)
    return _raw_bytes(t.to(dtype_from_name(wire_dtype))), 1.0


def decode_kv(data: bytes, wire_dtype: str, scale: float, shape: tuple[int, int, int],
              out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of encode_kv: a new [n, kv_heads, head_dim] tensor of out_dtype.

    wire_dtype "" means the bytes are already in out_dtype. Raises ValueError when the
    byte count does not match the shape.
    """
    wire = dtype_from_name(wire_dtype) if wire_dtype else out_dtype
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        raise ValueError(f"corrupt KV chunk: {len(data)} bytes, expected {expected} for shape "
                         f"{tuple(shape)} in {dtype_name(wire)}; the peer is incompatible or the stream broke")
    if expected == 0:
        return torch.empty(shape, dtype=out_dtype)
    # bytes are immutable; a bytearray copy gives torch a writable buffer (no warning)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if wire == torch.float8_e4m3fn:
        return _dequantize_fp8(raw.view(shape), scale, out_dtype)
    t = raw.view(wire).view(shape)
    return t if wire == out_dtype else t.to(out_dtype)


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc_for_kv_messages(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc reuse freed MiB-sized buffers instead of mmap()ing fresh pages for each.

    Every KV message allocates several MiB-sized buffers (protobuf arena, serialized
    bytes, gRPC slices). By default glibc serves them with new mappings whose first-touch
    page faults cost more than the copies themselves (about 20x per 1 MiB message in a
    VM). Call once per process at startup; the process keeps up to trim_threshold of
    freed heap. Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:
    glibc.malloc.trim_threshold=... . Returns False where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
