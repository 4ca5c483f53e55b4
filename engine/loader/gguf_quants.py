"""Vectorized torch dequantization of GGML block formats (layouts as in llama.cpp's ggml-common.h).

Each kernel takes the raw bytes of a tensor viewed as `[n_blocks, type_size]` uint8 and returns
`[n_blocks, block_size]` float32. All work is done with whole-tensor torch ops, no Python loops
over blocks, so the cost is a few memory passes per tensor.
"""
from __future__ import annotations

import math
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32 of shape [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Low nibbles of each `width`-byte group, then its high nibbles: uint8 [n, groups * 2, width]."""
    n = qs.shape[0]
    src = qs.reshape(n, groups, 1, width)
    out = torch.empty(n, groups, 2, width, dtype=torch.uint8)
    torch.bitwise_and(src, 0x0F, out=out[:, :, :1])
    torch.bitwise_right_shift(src, 4, out=out[:, :, 1:])
    return out.reshape(n, groups * 2, width)


def _bits(packed: torch.Tensor, groups: int, width: int, bits: int) -> torch.Tensor:
    """`bits`-bit fields: per `width`-byte group, field k of every byte in turn: [n, groups * 8 // bits, width]."""
    n = packed.shape[0]
    per_byte = 8 // bits
    src = packed.reshape(n, groups, width)
    out = torch.empty(n, groups, per_byte, width, dtype=torch.uint8)
    for k in range(per_byte):
        torch.bitwise_right_shift(src, k * bits, out=out[:, :, k])
    out.bitwise_and_((1 << bits) - 1)
    return out.reshape(n, groups * per_byte, width)


def _bits_of_u32(qh: torch.Tensor) -> torch.Tensor:
    """Bit j of each little-endian uint32, j = 0..31: uint8 [n, 32]."""
    n = qh.shape[0]
    out = torch.empty(n, 4, 8, dtype=torch.uint8)
    for k in range(8):
        torch.bitwise_right_shift(qh, k, out=out[:, :, k])
    return out.bitwise_and_(1).reshape(n, 32)


def _with_high_bit(low: torch.Tensor, high: torch.Tensor, shift: int) -> torch.Tensor:
    """low | high << shift, reusing `low`'s memory."""
    return low.bitwise_or_(high.bitwise_left_shift(shift))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 2:], 1, 16).reshape(-1, 32).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:], 1, 16).reshape(-1, 32).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _with_high_bit(_nibbles(b[:, 6:], 1, 16).reshape(-1, 32), _bits_of_u32(b[:, 2:6]), 4)
    return q.float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _with_high_bit(_nibbles(b[:, 8:], 1, 16).reshape(-1, 32), _bits_of_u32(b[:, 4:8]), 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(b[:, 16:80], 2, 32, 2).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 96:108]
    low = _nibbles(scales[:, :8], 1, 8).reshape(n, 16)
    high = _bits(scales[:, 8:], 1, 4, 2).reshape(n, 16)
    sc = _with_high_bit(low, high, 4).float().sub_(32)
    dl = (_f16(b, 108) * sc).reshape(n, 16, 1)
    # q = low2 - 4 + 4 * hmask_bit: a clear hmask bit means "subtract 4"
    q = _with_high_bit(_bits(b[:, 32:96], 2, 32, 2), _bits(b[:, :32], 1, 32, 1), 2)
    return q.reshape(n, 16, 16).float().sub_(4).mul_(dl).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed into 12 bytes (Q4_K, Q5_K)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    return _nibbles(b[:, 16:], 4, 32).float().mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _with_high_bit(_nibbles(b[:, 48:], 4, 32), _bits(b[:, 16:48], 1, 32, 1), 4)
    return q.float().mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    q = _with_high_bit(_nibbles(b[:, :128], 2, 64).reshape(n, 8, 32), _bits(b[:, 128:192], 2, 32, 2), 4)
    return q.reshape(n, 16, 16).float().sub_(32).mul_(d).reshape(n, QK_K)


_BLOCK_KERNELS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED_TYPES: tuple[Q, ...] = (*_FLOAT_TYPES, *_BLOCK_KERNELS)


_THREADS_LOCK = threading.Lock()


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Dequantization is memory-bound: one thread is as fast as two here, and it avoids
    OpenMP barrier stalls (10x-50x slowdowns) when other processes share the cores."""
    with _THREADS_LOCK:
        num_threads = torch.get_num_threads()
        if num_threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(num_threads)


def _as_bytes(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().reshape(-1).view(torch.uint8)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # GGUFReader memmaps read-only; we never write to this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def check_supported(qtype: Q | int) -> None:
    """Raise ValueError naming `qtype` and the supported types unless dequantize can handle it."""
    if qtype not in SUPPORTED_TYPES:
        try:
            label = Q(qtype).name
        except ValueError:
            label = str(qtype)
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"GGUF tensor type {label} is not supported; supported types: {names}; "
                         "re-quantize the model to one of them")


def dequantize(raw: np.ndarray | torch.Tensor, qtype: Q | int, shape: Sequence[int]) -> torch.Tensor:
    """Dequantize one GGUF tensor's data to a float32 tensor of `shape`.

    `raw` is `ReaderTensor.data` (any dtype; its bytes are used), `shape` the logical torch shape
    (GGUF's dims reversed, innermost last). The result owns its memory.
    """
    check_supported(qtype)
    qtype = Q(qtype)
    data = _as_bytes(raw)
    numel = math.prod(shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if numel % block_size or data.numel() != numel // block_size * type_size:
        raise ValueError(f"{qtype.name} data of {data.numel()} bytes does not match shape {tuple(shape)}; "
                         "the GGUF file is truncated or corrupt")
    with _single_threaded():
        if qtype in _FLOAT_TYPES:
            values = data.view(_FLOAT_TYPES[qtype])
            out = values.float() if qtype != Q.F32 else values.clone()
        else:
            out = _BLOCK_KERNELS[qtype](data.reshape(-1, type_size))
    return out.reshape(tuple(shape))
