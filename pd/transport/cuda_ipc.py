"""CUDA IPC sharing of a KV pool between processes on one GPU host (the GPU counterpart
of shm.SharedKVBuffer).

UNTESTED on the CPU machines the test suite runs on: only the "CUDA unavailable" error
path is exercised there. It uses the same storage calls as torch.multiprocessing
(`_share_cuda_` / `_new_shared_cuda`). The exporting process must keep its tensor alive
as long as any importer uses it, and a process imports a given handle once.
"""
from __future__ import annotations

import io
import pickle

import torch


class _LiteralUnpickler(pickle.Unpickler):
    # a handle comes from a peer: allow plain literals (tuples, ints, bytes, str) only
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"CUDA IPC handle refers to {module}.{name}; not a handle")


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA IPC needs a CUDA build of torch and a visible GPU; "
                           "use the shared-memory (CPU) local transport or the grpc transport")


def export_handle(tensor: torch.Tensor) -> bytes:
    """Bytes that let another process on this host map `tensor` (a CUDA tensor)."""
    _require_cuda()
    if not tensor.is_cuda:
        raise ValueError(f"export_handle needs a CUDA tensor, got one on {tensor.device}")
    storage_handle = tensor.untyped_storage()._share_cuda_()
    layout = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
              tuple(tensor.stride()), tensor.storage_offset())
    return pickle.dumps((storage_handle, layout))


def import_handle(handle: bytes) -> torch.Tensor:
    """The tensor exported by export_handle in another process, mapped without copying."""
    _require_cuda()
    storage_handle, (dtype_name, shape, stride, offset) = _LiteralUnpickler(io.BytesIO(handle)).load()
    dtype = getattr(torch, dtype_name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"CUDA IPC handle names {dtype_name!r}, which is not a torch dtype")
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(*storage_handle)
    return torch.empty((0,), dtype=dtype, device=storage.device).set_(storage, offset, shape, stride)
