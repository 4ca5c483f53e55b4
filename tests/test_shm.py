"""Shared-memory KV buffer: zero-copy views, cross-process visibility, cleanup."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from pd.transport.cuda_ipc import export_handle, import_handle
from pd.transport.shm import SharedKVBuffer

SIZE = 64 * 1024


def _shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def _child_reads_then_writes(name: str, size: int, queue) -> None:
    with SharedKVBuffer.attach(name, size) as buf:
        view = buf.tensor(torch.float32)
        queue.put(view[:4].tolist())
        view[4:8] = torch.tensor([7.0, 8.0, 9.0, 10.0])
        del view


def test_tensor_is_a_zero_copy_writable_view():
    with SharedKVBuffer.create(SIZE) as buf:
        raw = buf.tensor()
        halves = buf.tensor(torch.bfloat16)
        assert raw.numel() == SIZE and halves.numel() == SIZE // 2
        halves[0] = 1.0  # 0x3f80, little-endian
        assert raw[:2].tolist() == [0x80, 0x3F]
        del raw, halves


def test_spawned_process_sees_writes_and_its_writes_come_back():
    with SharedKVBuffer.create(SIZE) as buf:
        view = buf.tensor(torch.float32)
        view[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_reads_then_writes, args=(buf.name, SIZE, queue))
        child.start()
        seen = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert seen == [1.0, 2.0, 3.0, 4.0]
        assert view[4:8].tolist() == [7.0, 8.0, 9.0, 10.0]
        assert _shm_exists(buf.name)  # the attacher's exit did not unlink it
        del view


def test_unrelated_process_attaching_by_name_does_not_unlink_at_exit():
    with SharedKVBuffer.create(SIZE) as buf:
        view = buf.tensor()
        view[:3] = torch.tensor([5, 6, 7], dtype=torch.uint8)
        code = ("import sys, torch; from pd.transport.shm import SharedKVBuffer\n"
                "b = SharedKVBuffer.attach(sys.argv[1], int(sys.argv[2])); t = b.tensor()\n"
                "print(t[:3].tolist()); t[3] = 42; del t")  # exits without close()
        out = subprocess.run([sys.executable, "-c", code, buf.name, str(SIZE)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[5, 6, 7]"
        assert out.stderr == ""
        assert view[3].item() == 42 and _shm_exists(buf.name)
        del view


def test_owner_close_unlinks_the_segment():
    buf = SharedKVBuffer.create(SIZE)
    name = buf.name
    assert _shm_exists(name)
    t = buf.tensor()
    t.fill_(1)
    del t
    buf.close()
    buf.close()  # idempotent
    assert buf.is_closed and not _shm_exists(name)


def test_attacher_close_leaves_the_segment_to_the_owner():
    with SharedKVBuffer.create(SIZE) as owner:
        SharedKVBuffer.attach(owner.name, SIZE).close()
        assert _shm_exists(owner.name)
        assert not owner.is_closed
    assert not _shm_exists(owner.name)


def test_close_refuses_while_a_tensor_views_the_buffer():
    buf = SharedKVBuffer.create(SIZE)
    keys = buf.tensor(torch.float16).view(-1, 64)[2:5]  # a derived view keeps it mapped too
    with pytest.raises(BufferError, match="delete them before close"):
        buf.close()
    keys.fill_(2.0)  # still mapped and usable
    del keys
    buf.close()
    assert not _shm_exists(buf.name)


def test_owner_exit_without_close_unlinks_the_segment():
    code = ("import torch; from pd.transport.shm import SharedKVBuffer\n"
            "b = SharedKVBuffer.create(4096); t = b.tensor(); print(b.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not _shm_exists(out.stdout.strip())
    assert out.stderr == ""  # no resource-tracker or SharedMemory.__del__ complaints


def test_attach_to_a_missing_or_smaller_segment_fails_clearly():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SharedKVBuffer.attach("pdkv_no_such_segment", SIZE)
    with SharedKVBuffer.create(SIZE) as buf:
        with pytest.raises(ValueError, match="refusing to attach"):
            SharedKVBuffer.attach(buf.name, 2 * SIZE)


def test_leaving_the_with_block_on_an_error_keeps_that_error():
    with pytest.raises(KeyError):
        with SharedKVBuffer.create(SIZE) as buf:
            view = buf.tensor()  # still alive in the traceback's frame
            raise KeyError("the real error")
    del view
    buf.close()
    assert not _shm_exists(buf.name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_ipc_raises_a_clear_error_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA IPC needs a CUDA build"):
        export_handle(torch.zeros(4))
    with pytest.raises(RuntimeError, match="CUDA IPC needs a CUDA build"):
        import_handle(b"")
