"""engine.memory: huge-page arenas for weights and the KV pool, malloc tuning."""
from __future__ import annotations

import mmap
import platform

import pytest
import torch

from engine.memory import HUGE_PAGE, huge_page_buffer, move_to_huge_pages, tune_malloc

needs_thp = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")


@needs_thp
def test_buffer_is_zeroed_aligned_and_writable():
    buf = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buf is not None and buf.numel() == 3 * HUGE_PAGE + 5 and buf.dtype == torch.uint8
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert int(buf.sum()) == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7


def test_buffer_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PDSERVE_HUGE_PAGES", "0")
    assert huge_page_buffer(4 * HUGE_PAGE) is None


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(4096, 256)
        self.proj = torch.nn.Linear(256, 512)
        self.head = torch.nn.Linear(256, 4096, bias=False)
        self.head.weight = self.embed.weight  # tied, as small LLMs do
        self.register_buffer("table", torch.arange(1000, dtype=torch.float32))


@needs_thp
def test_move_keeps_values_ties_and_outputs():
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randn(3, 256)
    before = (model.proj(x), model.head(x), model.table.clone())
    moved = move_to_huge_pages(model)
    assert moved >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.proj(x), before[0]) and torch.equal(model.head(x), before[1])
    assert torch.equal(model.table, before[2])
    ptrs = sorted(t.data_ptr() for t in [*model.parameters(), *model.buffers()])
    assert ptrs[-1] - ptrs[0] < moved and all(p % 64 == 0 for p in ptrs)  # one arena, aligned


def test_small_models_are_left_alone():
    model = torch.nn.Linear(8, 8)
    ptr = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.weight.data_ptr() == ptr


def test_tune_malloc_succeeds_on_glibc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc() is True
