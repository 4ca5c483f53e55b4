"""Copy a token range of one request's KV between two paged pools (the local transport).

A pool layer is [2, num_slots, kv_heads, head_dim] (keys, values), slot = block_id *
block_size + offset, and a request's position p sits at offset p % block_size of block
block_table[p // block_size] on both sides. A token range therefore splits into pieces of
slots that are consecutive on both sides; consecutive pieces merge into runs. KVCopyPlan
finds the runs once per request and range (every layer has the same ones) and copies a
layer with as few calls as the block tables allow:

  few or long runs       one slice copy per run, keys and values together
  many runs, whole blocks gathered straight into consecutive destination blocks, or
                          scattered straight from consecutive source blocks, or (both
                          sides scattered) gathered into a scratch buffer and scattered

On CPU every copy is a memmove (ctypes for slices, numpy for index copies) on the calling
thread with the GIL released: no OpenMP team to wake while the engine's own threads hold
the cores. Other devices use the
torch equivalents (copy_, index_select, index_copy_).
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import torch

MAX_SLICE_RUNS = 8  # up to this many runs, or runs of 2+ blocks on average: slice by slice


def _as_ids(ids: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _merge(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(src, dst, length) runs: pieces merge while both sides continue the previous one."""
    breaks = (src[1:] != src[:-1] + lengths[:-1]) | (dst[1:] != dst[:-1] + lengths[:-1])
    first = np.flatnonzero(np.concatenate([[True], breaks]))
    return list(zip(src[first].tolist(), dst[first].tolist(), np.add.reduceat(lengths, first).tolist()))


class KVCopyPlan:
    """How to copy positions [start, start + num_tokens) of a request from a pool whose
    blocks for it are src_block_ids to one whose blocks are dst_block_ids."""

    def __init__(self, src_block_ids, dst_block_ids, start: int, num_tokens: int, block_size: int,
                 src_num_blocks: int | None = None, dst_num_blocks: int | None = None):
        if start < 0 or num_tokens <= 0 or block_size <= 0:
            raise ValueError(f"KV copy needs start >= 0, num_tokens > 0 and block_size > 0, got "
                             f"{start}, {num_tokens}, {block_size}")
        sb, db = _as_ids(src_block_ids), _as_ids(dst_block_ids)
        end = start + num_tokens
        b0, b1 = start // block_size, (end - 1) // block_size + 1
        for ids, limit, side in ((sb, src_num_blocks, "source"), (db, dst_num_blocks, "destination")):
            if ids.size < b1:
                raise ValueError(f"{side} block table has {ids.size} blocks; positions up to {end} need {b1}")
            used = ids[b0:b1]
            if used.min() < 0 or (limit is not None and used.max() >= limit):
                raise ValueError(f"{side} block ids must lie in [0, {limit}), got "
                                 f"{int(used.min())}..{int(used.max())}")
        self.block_size, self.num_tokens = block_size, num_tokens
        blocks = np.arange(b0, b1, dtype=np.int64)
        lo = np.maximum(start, blocks * block_size)
        hi = np.minimum(end, (blocks + 1) * block_size)
        offset = lo - blocks * block_size
        src_slots, dst_slots = sb[b0:b1] * block_size + offset, db[b0:b1] * block_size + offset
        self.runs = _merge(src_slots, dst_slots, hi - lo)
        # whole-block pieces (for index copies) and the partial ones at the range's ends
        whole = hi - lo == block_size
        self.src_blocks, self.dst_blocks = sb[b0:b1][whole], db[b0:b1][whole]
        self.partial = [(int(s), int(d), int(n)) for s, d, n in
                        zip(src_slots[~whole], dst_slots[~whole], (hi - lo)[~whole])]
        self._max_src, self._max_dst = int(sb[b0:b1].max()), int(db[b0:b1].max())
        self._order: dict[str, tuple] = {}
        self._mode: str | None = None
        self._scratch: np.ndarray | None = None

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    @property
    def mode(self) -> str:
        if self._mode is None:
            num_blocks = -(-self.num_tokens // self.block_size)
            if len(self.runs) <= max(MAX_SLICE_RUNS, num_blocks // 2):
                self._mode = "slices"   # one memmove per run beats two passes by index (measured)
            elif len(self._block_runs(by="dst")[2]) <= MAX_SLICE_RUNS:
                self._mode = "gather"   # consecutive destination blocks: gather straight into them
            elif len(self._block_runs(by="src")[2]) <= MAX_SLICE_RUNS:
                self._mode = "scatter"  # consecutive source blocks: scatter straight from them
            else:
                self._mode = "gather_scatter"
        return self._mode

    def _block_runs(self, by: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """Whole blocks sorted by their `by` side, and the (lo, hi) index ranges where that
        side is consecutive."""
        if by not in self._order:
            key = self.dst_blocks if by == "dst" else self.src_blocks
            order = np.argsort(key, kind="stable")
            s, d = self.src_blocks[order], self.dst_blocks[order]
            k = d if by == "dst" else s
            cuts = np.flatnonzero(k[1:] != k[:-1] + 1) + 1
            edges = [0, *cuts.tolist(), k.size]
            self._order[by] = (s, d, [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a])
        return self._order[by]

    def copy_layer(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst[:, slots of the range] = src[:, slots of the range] for one layer's
        [2, num_slots, kv_heads, head_dim] tensors (same dtype and row shape)."""
        if src.dtype != dst.dtype or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
            raise ValueError(f"KV copy needs matching layers, got {src.dtype}{tuple(src.shape)} and "
                             f"{dst.dtype}{tuple(dst.shape)}")
        bs = self.block_size
        if self._max_src >= src.shape[1] // bs or self._max_dst >= dst.shape[1] // bs:
            raise ValueError(f"block ids {self._max_src} / {self._max_dst} outside pools of "
                             f"{src.shape[1] // bs} / {dst.shape[1] // bs} blocks")
        if src.device.type != "cpu" or dst.device.type != "cpu":
            self._copy_torch(src, dst)
            return
        mode = self.mode
        if mode == "slices":
            _copy_runs(src, dst, self.runs)
            return
        _copy_runs(src, dst, self.partial)
        sblk, dblk = _items(_blocks(src, self.block_size), 1), _items(_blocks(dst, self.block_size), 1)
        if mode == "gather":
            si, di, runs = self._block_runs(by="dst")
            for lo, hi in runs:
                for kv in range(sblk.shape[0]):
                    np.take(sblk[kv], si[lo:hi], axis=0, out=dblk[kv, di[lo]:di[lo] + hi - lo], mode="clip")
        elif mode == "scatter":
            si, di, runs = self._block_runs(by="src")
            for lo, hi in runs:
                dblk[:, di[lo:hi]] = sblk[:, si[lo]:si[lo] + hi - lo]
        else:
            n = self.src_blocks.size
            if self._scratch is None or self._scratch.shape != (n, *sblk.shape[2:]):
                self._scratch = np.empty((n, *sblk.shape[2:]), dtype=sblk.dtype)
            for kv in range(sblk.shape[0]):
                np.take(sblk[kv], self.src_blocks, axis=0, out=self._scratch, mode="clip")
                dblk[kv, self.dst_blocks] = self._scratch

    def _copy_torch(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.mode == "slices":
            for a, b, n in self.runs:
                dst[:, b:b + n].copy_(src[:, a:a + n].to(dst.device))
            return
        for a, b, n in self.partial:
            dst[:, b:b + n].copy_(src[:, a:a + n].to(dst.device))
        sblk, dblk = _blocks(src, self.block_size), _blocks(dst, self.block_size)
        si = torch.as_tensor(self.src_blocks, device=src.device)
        di = torch.as_tensor(self.dst_blocks, device=dst.device)
        dblk.index_copy_(1, di, sblk.index_select(1, si).to(dst.device))


def _copy_runs(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
    """dst[:, d:d + n] = src[:, s:s + n] for each (s, d, n): one memmove per run and k/v
    (ctypes releases the GIL). Slot bounds were checked by the caller."""
    row = _item_bytes(src, 0) // src.shape[1]  # checks that the slots are contiguous rows
    if _item_bytes(dst, 0) // dst.shape[1] != row:
        raise ValueError("KV copy needs the same slot size on both sides")
    isz = src.element_size()
    for kv in range(src.shape[0]):
        s_base = src.data_ptr() + kv * src.stride(0) * isz
        d_base = dst.data_ptr() + kv * dst.stride(0) * isz
        for a, b, n in runs:
            ctypes.memmove(d_base + b * row, s_base + a * row, n * row)


def _blocks(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """[2, num_slots, ...] -> [2, num_blocks, block_size, ...] (a view)."""
    if t.shape[1] % block_size:
        raise ValueError(f"a pool of {t.shape[1]} slots is not made of {block_size}-slot blocks")
    return t.view(t.shape[0], t.shape[1] // block_size, block_size, *t.shape[2:])


def _item_bytes(t: torch.Tensor, dim: int) -> int:
    """Bytes spanned by all the dims after `dim`, which must lie contiguously in memory."""
    expected = 1
    for n, stride in zip(reversed(t.shape[dim + 1:]), reversed(t.stride()[dim + 1:])):
        if n > 1 and stride != expected:
            raise ValueError(f"KV copy needs contiguous slots, got shape {tuple(t.shape)} strides {t.stride()}")
        expected *= n
    return expected * t.element_size()


def _items(t: torch.Tensor, dim: int) -> np.ndarray:
    """numpy's view of a CPU tensor as [*t.shape[:dim + 1]] items, each holding all of the
    dims after `dim` (which must be contiguous): no copy, writable."""
    holder = _ArrayInterface(t, {
        "version": 3, "data": (t.data_ptr(), False), "shape": tuple(t.shape[:dim + 1]),
        "strides": tuple(s * t.element_size() for s in t.stride()[:dim + 1]),
        "typestr": f"|V{_item_bytes(t, dim)}"})
    return np.asarray(holder)


class _ArrayInterface:
    def __init__(self, tensor: torch.Tensor, interface: dict):
        self.tensor = tensor  # the numpy view's base: keeps the memory alive
        self.__array_interface__ = interface
