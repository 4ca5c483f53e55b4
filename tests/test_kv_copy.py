"""KVCopyPlan: a request's token range copied between paged pools, against index_copy_."""
from __future__ import annotations

import random

import pytest
import torch

from pd.transport.kv_copy import MAX_SLICE_RUNS, KVCopyPlan
from pd.transport.shm import SharedKVBuffer


def _expected(src, dst, src_blocks, dst_blocks, start, n, bs):
    pos = torch.arange(start, start + n)
    si = torch.tensor(src_blocks)[pos // bs] * bs + pos % bs
    di = torch.tensor(dst_blocks)[pos // bs] * bs + pos % bs
    out = dst.clone()
    out[:, di] = src[:, si]
    return out


def _layers(num_src_blocks, num_dst_blocks, bs, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(2, num_src_blocks * bs, 3, 4, generator=g).to(dtype)
    dst = torch.randn(2, num_dst_blocks * bs, 3, 4, generator=g).to(dtype)
    return src, dst


@pytest.mark.parametrize("src_blocks,dst_blocks,mode", [
    (list(range(2, 10)), list(range(10, 18)), "slices"),            # one run
    ([0, 1, 2, 6, 7, 8], [3, 4, 5, 12, 13, 14], "slices"),          # two runs
    (list(range(20, 0, -2)), list(range(20, 30)), "gather"),        # scattered source, consecutive destination
    (list(range(10, 20)), list(range(38, 18, -2)), "scatter"),      # consecutive source, scattered destination
    ([5, 31, 0, 11, 3, 7, 22, 9, 14, 27], [19, 2, 4, 0, 8, 33, 25, 11, 38, 15], "gather_scatter"),
])
def test_each_copy_mode_matches_index_copy(src_blocks, dst_blocks, mode):
    bs = 4
    src, dst = _layers(32, 40, bs)
    n = len(src_blocks) * bs
    plan = KVCopyPlan(src_blocks, dst_blocks, 0, n, bs)
    assert plan.mode == mode
    expected = _expected(src, dst, src_blocks, dst_blocks, 0, n, bs)
    plan.copy_layer(src, dst)
    assert torch.equal(dst, expected)


def test_random_ranges_tables_and_dtypes_match_index_copy():
    rng = random.Random(0)
    seen = set()
    for trial in range(200):
        bs = rng.choice([1, 4, 16])
        num_src, num_dst = rng.randint(4, 48), rng.randint(4, 48)
        max_tokens = min(num_src, num_dst) * bs
        start = rng.randint(0, max_tokens - 1)
        n = rng.randint(1, max_tokens - start)
        need = (start + n - 1) // bs + 1
        src_blocks, dst_blocks = rng.sample(range(num_src), need), rng.sample(range(num_dst), need)
        if rng.random() < 0.3:
            src_blocks.sort()
        if rng.random() < 0.3:
            dst_blocks.sort()
        src, dst = _layers(num_src, num_dst, bs, rng.choice([torch.bfloat16, torch.float32]), seed=trial)
        plan = KVCopyPlan(src_blocks, dst_blocks, start, n, bs)
        expected = _expected(src, dst, src_blocks, dst_blocks, start, n, bs)
        plan.copy_layer(src, dst)
        assert torch.equal(dst, expected), (trial, plan.mode)
        seen.add(plan.mode)
    assert seen == {"slices", "gather", "scatter", "gather_scatter"}


def test_a_layer_of_a_whole_pool_in_shared_memory():
    bs, layers = 4, 3
    g = torch.Generator().manual_seed(1)
    src = torch.randn(layers, 2, 24 * bs, 3, 4, generator=g).to(torch.bfloat16)
    dst = torch.zeros(layers, 2, 30 * bs, 3, 4, dtype=torch.bfloat16)
    src_blocks = [7, 1, 19, 4, 12, 0, 22, 9, 15, 3, 11, 17]
    dst_blocks = [29, 3, 8, 14, 0, 21, 5, 26, 10, 17, 2, 24]
    n = len(src_blocks) * bs - 3  # a partial last block
    plan = KVCopyPlan(src_blocks, dst_blocks, 5, n - 5, bs)
    assert plan.num_runs > MAX_SLICE_RUNS
    with SharedKVBuffer.create(src.numel() * src.element_size()) as buf:
        shared = buf.tensor(torch.bfloat16).view(src.shape)
        shared.copy_(src)
        expected = dst.clone()
        expected[1] = _expected(src[1], dst[1], src_blocks, dst_blocks, 5, n - 5, bs)
        plan.copy_layer(shared[1], dst[1])
        del shared
    assert torch.equal(dst, expected)  # only layer 1, only the range


def test_bad_tables_and_layers_are_refused():
    src, dst = _layers(8, 8, 4)
    with pytest.raises(ValueError, match="source block table has 1 blocks"):
        KVCopyPlan([0], [0, 1], 0, 8, 4)
    with pytest.raises(ValueError, match="destination block ids"):
        KVCopyPlan([0, 1], [0, 8], 0, 8, 4, dst_num_blocks=8)
    with pytest.raises(ValueError, match="source block ids"):
        KVCopyPlan([-1, 1], [0, 1], 0, 8, 4)
    with pytest.raises(ValueError, match="num_tokens > 0"):
        KVCopyPlan([0], [0], 0, 0, 4)
    plan = KVCopyPlan([0, 9], [0, 1], 0, 8, 4)  # block 9 is beyond these 8-block layers
    with pytest.raises(ValueError, match="outside pools"):
        plan.copy_layer(src, dst)
    ok = KVCopyPlan([0, 1], [0, 1], 0, 8, 4)
    with pytest.raises(ValueError, match="matching layers"):
        ok.copy_layer(src, dst.float())
    with pytest.raises(ValueError, match="contiguous"):
        KVCopyPlan(list(range(8)), list(range(7, -1, -1)), 0, 32, 4).copy_layer(
            src.transpose(2, 3), dst.transpose(2, 3))


@pytest.mark.parametrize("src_blocks,dst_blocks", [
    (list(range(2, 10)), list(range(10, 18))),
    ([5, 31, 0, 11, 3, 7, 22, 9, 14, 27], [19, 2, 4, 0, 8, 33, 25, 11, 38, 15]),
])
def test_the_device_path_matches_index_copy(src_blocks, dst_blocks):
    """The torch-op path that GPU pools take, run here on CPU tensors."""
    bs = 4
    src, dst = _layers(32, 40, bs)
    start, n = 3, len(src_blocks) * bs - 5
    plan = KVCopyPlan(src_blocks, dst_blocks, start, n, bs)
    expected = _expected(src, dst, src_blocks, dst_blocks, start, n, bs)
    plan._copy_torch(src, dst)
    assert torch.equal(dst, expected)
