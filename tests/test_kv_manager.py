"""KV cache manager: block tables, prefix-cache hits, allocation without side effects on failure."""
from __future__ import annotations

import pytest

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, token_ids: list[int], salt: bytes = b"") -> Request:
    return Request(rid, list(token_ids), SamplingParams(), cache_salt=salt)


def make_manager(num_blocks: int = 16, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, enable_caching), BS)


def compute_prompt(kv: KVCacheManager, req: Request) -> list[int]:
    """Admits `req` the way the scheduler does and marks its whole prompt computed."""
    blocks, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, blocks) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return kv.block_table(req.request_id)


def test_cold_cache_has_no_computed_blocks():
    kv = make_manager()
    assert kv.get_computed_blocks(make_request("a", range(12))) == ([], 0)


def test_computed_blocks_are_the_longest_cached_prefix_of_full_blocks():
    kv = make_manager()
    table = compute_prompt(kv, make_request("a", range(12)))
    diverging = make_request("b", [0, 1, 2, 3, 4, 5, 6, 7, 99, 99, 99, 99, 99])
    assert kv.get_computed_blocks(diverging) == (table[:2], 8)


def test_prefix_match_stops_at_the_first_differing_block():
    kv = make_manager()
    table = compute_prompt(kv, make_request("a", range(12)))
    second_block_differs = make_request("b", [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])
    assert kv.get_computed_blocks(second_block_differs) == (table[:1], 4)


def test_prompt_of_exactly_n_cached_blocks_gets_n_minus_one_to_leave_a_token_to_compute():
    kv = make_manager()
    table = compute_prompt(kv, make_request("a", range(12)))
    blocks, num_hit = kv.get_computed_blocks(make_request("b", range(12)))
    assert (blocks, num_hit) == (table[:2], 8)


def test_one_token_past_the_cached_blocks_hits_every_block():
    kv = make_manager()
    table = compute_prompt(kv, make_request("a", range(12)))
    blocks, num_hit = kv.get_computed_blocks(make_request("b", list(range(12)) + [50]))
    assert (blocks, num_hit) == (table, 12)


def test_different_cache_salt_never_hits():
    kv = make_manager()
    compute_prompt(kv, make_request("a", range(12), salt=b"tenant-a"))
    assert kv.get_computed_blocks(make_request("b", range(13), salt=b"tenant-b")) == ([], 0)


def test_caching_disabled_never_hits():
    kv = make_manager(enable_caching=False)
    compute_prompt(kv, make_request("a", range(12)))
    assert kv.get_computed_blocks(make_request("b", range(13))) == ([], 0)


def test_allocate_slots_reserves_enough_blocks_for_the_new_tokens():
    kv = make_manager()
    req = make_request("a", range(9))
    new = kv.allocate_slots(req, 9)
    assert len(new) == 3
    assert kv.block_table("a") == new
    assert kv.pool.num_free_blocks == 13


def test_allocate_slots_adds_a_block_only_when_crossing_a_block_boundary():
    kv = make_manager()
    req = make_request("a", range(7))
    kv.allocate_slots(req, 7)
    req.num_computed_tokens = 7
    assert kv.allocate_slots(req, 1) == []  # position 7 still fits block 1
    req.num_computed_tokens = 8
    assert len(kv.allocate_slots(req, 1)) == 1
    assert len(kv.block_table("a")) == 3


def test_allocate_slots_returns_none_without_side_effects_when_blocks_are_short():
    kv = make_manager(num_blocks=4)
    other = make_request("other", range(8))
    kv.allocate_slots(other, 8)
    assert kv.allocate_slots(make_request("a", range(9)), 9) is None
    assert kv.pool.num_free_blocks == 2
    assert kv.block_table("a") == []
    assert "a" not in kv.block_tables


def test_allocate_slots_counts_revived_cached_blocks_against_free_blocks():
    kv = make_manager(num_blocks=4)
    a = make_request("a", range(8))
    compute_prompt(kv, a)
    kv.free(a)  # 2 free cached blocks + 2 plain ones
    kv.allocate_slots(make_request("filler", range(8)), 8)  # takes the 2 plain blocks
    b = make_request("b", list(range(8)) + [50])
    blocks, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    # 1 new block is needed on top of reviving 2 cached ones, but only those 2 are free.
    assert kv.allocate_slots(b, 1, blocks) is None
    assert kv.pool.num_free_blocks == 2
    assert [kv.pool.blocks[bid].ref_count for bid in blocks] == [0, 0]
    assert kv.block_table("b") == []


def test_allocate_slots_with_a_cache_hit_takes_a_reference_on_the_hit_blocks():
    kv = make_manager()
    a = make_request("a", range(8))
    table_a = compute_prompt(kv, a)
    b = make_request("b", list(range(8)) + [50])
    blocks, _ = kv.get_computed_blocks(b)
    kv.allocate_slots(b, 1, blocks)
    assert kv.block_table("b")[:2] == table_a
    assert [kv.pool.blocks[bid].ref_count for bid in table_a] == [2, 2]


def test_allocate_slots_with_a_cache_hit_allocates_only_the_blocks_beyond_the_hit():
    kv = make_manager(num_blocks=16)
    compute_prompt(kv, make_request("a", range(8)))
    b = make_request("b", list(range(8)) + [50, 51, 52])  # 11 tokens: 3 blocks in all
    blocks, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    new = kv.allocate_slots(b, 3, blocks)
    assert len(new) == 1
    assert len(kv.block_table("b")) == 3


def test_cache_full_blocks_registers_nothing_before_tokens_are_computed():
    kv = make_manager()
    req = make_request("a", range(12))
    kv.allocate_slots(req, 12)
    kv.cache_full_blocks(req)
    assert kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", range(13))) == ([], 0)


def test_cache_full_blocks_registers_only_computed_full_blocks():
    kv = make_manager()
    req = make_request("a", range(12))
    table = kv.allocate_slots(req, 12)
    req.num_computed_tokens = 6  # chunked prefill: block 0 full, block 1 half done
    kv.cache_full_blocks(req)
    assert kv.pool.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("b", range(13))) == (table[:1], 4)
    req.num_computed_tokens = 12
    kv.cache_full_blocks(req)
    assert kv.get_computed_blocks(make_request("c", range(13))) == (table, 12)


def test_free_returns_every_block_to_the_pool():
    kv = make_manager()
    baseline = kv.pool.num_free_blocks
    req = make_request("a", range(10))
    compute_prompt(kv, req)
    kv.free(req)
    assert kv.pool.num_free_blocks == baseline
    assert kv.block_table("a") == []
    assert kv.num_held_blocks() == 0


def test_freed_blocks_stay_cached_for_a_later_request():
    kv = make_manager()
    a = make_request("a", range(8))
    table_a = list(compute_prompt(kv, a))
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", range(9))) == (table_a, 8)


def test_freeing_a_request_makes_its_tail_blocks_evicted_before_its_head():
    kv = make_manager(num_blocks=3)
    a = make_request("a", range(12))
    table_a = list(compute_prompt(kv, a))
    kv.free(a)
    kv.pool.allocate(1)
    assert kv.get_computed_blocks(make_request("b", range(13))) == (table_a[:2], 8)


def test_second_request_with_a_shared_prefix_reuses_the_same_block_ids():
    kv = make_manager()
    a = make_request("a", list(range(8)) + [20, 21])
    b = make_request("b", list(range(8)) + [30, 31, 32])
    table_a = compute_prompt(kv, a)
    table_b = compute_prompt(kv, b)
    assert table_b[:2] == table_a[:2]
    assert not set(table_b[2:]) & set(table_a)
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 16
