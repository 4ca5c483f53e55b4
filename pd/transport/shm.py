"""POSIX shared memory backing for a KV pool (the local transport on CPU).

The prefill node creates the pool in a SharedKVBuffer and sends its name at handshake;
the decode node attaches by name and copies blocks out of it (pd.transport.kv_copy). Only the creator (owner)
ever unlinks the segment: on close(), at interpreter exit, or, if it is killed, through
multiprocessing's resource tracker. Attachers are never registered with a resource
tracker, so their exit cannot unlink a segment the owner still uses.

Tensors from .tensor() view the mapping without copying. Delete them before close():
close() raises BufferError while any of them is alive, rather than unmapping memory
that a tensor still points to.
"""
from __future__ import annotations

import atexit
import gc
import os
import secrets
import sys
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory

import torch

_TRACKER_LOCK = threading.Lock()


class _SharedMemory(shared_memory.SharedMemory):
    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, BufferError):
            pass  # tensors still view it (e.g. at exit): the mapping goes when they do


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return _SharedMemory(name=name, track=False)
    # Before 3.13 every SharedMemory registers with the resource tracker, which unlinks
    # it when the process exits (bpo-39959). Unregistering afterwards is wrong when the
    # tracker is shared with the owner (a multiprocessing child): the tracker keeps one
    # set entry per name, so it would drop the owner's registration. Skip registering.
    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda name, rtype: None
        try:
            return _SharedMemory(name=name)
        finally:
            resource_tracker.register = register


class SharedKVBuffer:
    """A named POSIX shared memory segment of size bytes, viewed as torch tensors."""

    def __init__(self, shm: shared_memory.SharedMemory, size: int, is_owner: bool):
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.size = size
        self.is_owner = is_owner
        self._owner_pid = os.getpid()
        self._views: list[weakref.ref[memoryview]] = []
        if is_owner:
            atexit.register(self._unlink_at_exit)

    @classmethod
    def create(cls, size_bytes: int, name_prefix: str = "pdkv") -> SharedKVBuffer:
        if size_bytes <= 0:
            raise ValueError(f"shared KV buffer size must be positive, got {size_bytes}")
        name = f"{name_prefix}_{os.getpid()}_{secrets.token_hex(6)}"
        return cls(_SharedMemory(name=name, create=True, size=size_bytes), size_bytes, is_owner=True)

    @classmethod
    def attach(cls, name: str, size_bytes: int) -> SharedKVBuffer:
        try:
            shm = _attach_untracked(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"shared KV buffer {name!r} does not exist; the peer that "
                                    "created it has closed it or is on another host") from None
        if shm.size < size_bytes:
            shm.close()
            raise ValueError(f"shared KV buffer {name!r} holds {shm.size} bytes, "
                             f"the peer announced {size_bytes}; refusing to attach")
        return cls(shm, size_bytes, is_owner=False)

    @property
    def is_closed(self) -> bool:
        return self._shm is None

    def tensor(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A flat, writable tensor over the whole buffer (zero copy)."""
        if self._shm is None:
            raise ValueError(f"shared KV buffer {self.name!r} is closed")
        if self.size % dtype.itemsize:
            raise ValueError(f"buffer of {self.size} bytes is not a whole number of {dtype}")
        # the tensor keeps this memoryview alive, and the memoryview keeps the mmap from
        # closing: a live tensor can never point at unmapped memory
        view = self._shm.buf[:self.size]
        self._views = [ref for ref in self._views if ref() is not None] + [weakref.ref(view)]
        return torch.frombuffer(view, dtype=dtype)

    def close(self) -> None:
        """Unmap (and, for the owner, unlink) the segment. Idempotent.

        Raises BufferError, leaving the buffer usable, while tensors from .tensor()
        are alive.
        """
        shm = self._shm
        if shm is None:
            return
        if self._num_live_views():
            gc.collect()  # views held only by reference cycles
        if num_views := self._num_live_views():
            raise BufferError(f"shared KV buffer {self.name!r} is still viewed by "
                              f"{num_views} tensor(s); delete them before close()")
        shm.close()
        self._shm = None
        if self.is_owner:
            atexit.unregister(self._unlink_at_exit)
            shm.unlink()

    def _num_live_views(self) -> int:
        return sum(ref() is not None for ref in self._views)

    def _unlink_at_exit(self) -> None:
        # tensors may still view the mapping at exit: only remove the name
        if self._shm is not None and os.getpid() == self._owner_pid:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> SharedKVBuffer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except BufferError:
            pass  # the traceback still holds tensors; don't hide the error that got us here

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        return f"SharedKVBuffer(name={self.name!r}, size={self.size}, {role})"
