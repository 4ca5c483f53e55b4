"""Packed (oneDNN blocked) linear weights: same results as F.linear, same shape and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear, linear, pack_weight

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 48, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 48, generator=g).to(dtype)
    packed = pack_weight(w)
    assert packed is not None and packed.is_mkldnn and packed.shape == w.shape and packed.dtype == dtype
    torch.testing.assert_close(linear(x, packed, b), F.linear(x, w, b), rtol=1e-5 if dtype == torch.float32 else 0,
                               atol=1e-5 if dtype == torch.float32 else 0)
    assert torch.equal(packed.to_dense(), w)


@needs_mkldnn
def test_layers_pack_at_finalize_and_keep_their_outputs():
    torch.manual_seed(0)
    merged = MergedColumnParallelLinear(32, [40, 40], False, torch.bfloat16)
    row = RowParallelLinear(40, 32, True, torch.bfloat16)
    for layer in (merged, row):
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape))
    x = torch.randn(5, 32).to(torch.bfloat16)
    before = row(merged(x)[:, :40])
    dense = merged.weight.detach().clone()
    for layer in (merged, row):
        layer.method.finalize(layer)
        assert layer.weight.is_mkldnn and not layer.weight.requires_grad
    assert merged.weight.shape == (80, 32) and torch.equal(merged.weight.to_dense(), dense)
    assert torch.equal(row(merged(x)[:, :40]), before)
    # an input in another dtype still works (through the dense values)
    torch.testing.assert_close(merged(x.float()), F.linear(x.float(), dense.float()), rtol=1e-2, atol=1e-2)


def test_packing_can_be_switched_off_and_skips_what_it_cannot_pack(monkeypatch):
    assert pack_weight(torch.randn(4, 4).half()) is None  # float16: left to F.linear
    assert pack_weight(torch.randn(4)) is None
    monkeypatch.setenv("PDSERVE_PACKED_LINEAR", "0")
    assert pack_weight(torch.randn(8, 8)) is None
    layer = RowParallelLinear(8, 8, False, torch.float32)
    layer.method.finalize(layer)
    assert not layer.weight.is_mkldnn
