"""Block pool: reference counts, free lists, the prefix-cache map and its events."""
from __future__ import annotations

import pytest

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.prefix_hash import ROOT_HASH, block_hash

TOKENS_A = (1, 2, 3, 4)
TOKENS_B = (5, 6, 7, 8)
TOKENS_C = (9, 10, 11, 12)


def h(tokens: tuple[int, ...]) -> int:
    return block_hash(ROOT_HASH, tokens)


def cached_free_block(pool: BlockPool, tokens: tuple[int, ...]) -> int:
    """Allocates a block, registers it under the hash of `tokens`, frees it (it stays cached)."""
    (bid,) = pool.allocate(1)
    pool.cache_block(bid, h(tokens), tokens)
    pool.free([bid])
    return bid


class Recorder:
    def __init__(self, pool: BlockPool):
        self.events: list[tuple[str, list[int]]] = []
        pool.listeners.append(lambda kind, hashes: self.events.append((kind, list(hashes))))


def test_pool_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_new_pool_has_every_block_free_and_nothing_cached():
    pool = BlockPool(8)
    assert pool.num_free_blocks == 8
    assert pool.num_cached_blocks == 0
    assert pool.usage() == 0.0


def test_allocate_hands_out_distinct_blocks_with_one_reference():
    pool = BlockPool(8)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3
    assert [pool.blocks[b].ref_count for b in ids] == [1, 1, 1]
    assert pool.num_free_blocks == 5


def test_free_returns_blocks_to_the_free_count():
    pool = BlockPool(8)
    ids = pool.allocate(3)
    pool.free(ids)
    assert pool.num_free_blocks == 8
    assert [pool.blocks[b].ref_count for b in ids] == [0, 0, 0]


def test_shared_block_is_free_only_after_its_last_reference_is_dropped():
    pool = BlockPool(4)
    (bid,) = pool.allocate(1)
    pool.cache_block(bid, h(TOKENS_A), TOKENS_A)
    pool.touch([bid])  # a second request finds it in the cache
    assert pool.blocks[bid].ref_count == 2
    pool.free([bid])
    assert pool.num_free_blocks == 3
    pool.free([bid])
    assert pool.num_free_blocks == 4


def test_double_free_raises():
    pool = BlockPool(4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids)


def test_free_of_a_never_allocated_block_raises():
    pool = BlockPool(4)
    with pytest.raises(RuntimeError):
        pool.free([2])


def test_asking_for_more_blocks_than_free_raises_memory_error_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_plain_free_blocks_are_handed_out_before_cached_ones():
    pool = BlockPool(3)
    cached = cached_free_block(pool, TOKENS_A)
    ids = pool.allocate(2)
    assert cached not in ids
    assert pool.lookup(h(TOKENS_A), TOKENS_A) == cached
    assert pool.num_evictions == 0


def test_cached_free_blocks_are_evicted_oldest_freed_first():
    pool = BlockPool(3)
    ids = pool.allocate(3)
    for bid, tokens in zip(ids, (TOKENS_A, TOKENS_B, TOKENS_C)):
        pool.cache_block(bid, h(tokens), tokens)
    pool.free([ids[1]])
    pool.free([ids[2]])
    pool.free([ids[0]])
    assert pool.allocate(1) == [ids[1]]
    assert pool.allocate(1) == [ids[2]]
    assert pool.lookup(h(TOKENS_A), TOKENS_A) == ids[0]
    assert pool.num_evictions == 2


def test_evicted_block_is_no_longer_found_and_comes_back_clean():
    pool = BlockPool(1)
    bid = cached_free_block(pool, TOKENS_A)
    assert pool.allocate(1) == [bid]
    assert pool.lookup(h(TOKENS_A), TOKENS_A) is None
    assert pool.blocks[bid].block_hash is None
    assert pool.num_cached_blocks == 0


def test_lookup_finds_a_cached_block_by_hash_and_tokens():
    pool = BlockPool(4)
    bid = cached_free_block(pool, TOKENS_A)
    assert pool.lookup(h(TOKENS_A), list(TOKENS_A)) == bid


def test_lookup_of_an_unknown_hash_misses():
    pool = BlockPool(4)
    cached_free_block(pool, TOKENS_A)
    assert pool.lookup(h(TOKENS_B), TOKENS_B) is None


def test_lookup_verifies_tokens_so_a_forged_hash_entry_misses():
    pool = BlockPool(4)
    (bid,) = pool.allocate(1)
    pool.cache_block(bid, h(TOKENS_A), TOKENS_B)  # hash of A, content of B
    assert pool.lookup(h(TOKENS_A), TOKENS_A) is None


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(2)
    bid = cached_free_block(pool, TOKENS_A)
    pool.touch([bid])
    assert pool.blocks[bid].ref_count == 1
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) != [bid]  # no longer evictable
    with pytest.raises(MemoryError):
        pool.allocate(1)
    assert pool.lookup(h(TOKENS_A), TOKENS_A) == bid


def test_cache_block_emits_stored_with_the_hash():
    pool = BlockPool(4)
    events = Recorder(pool)
    (bid,) = pool.allocate(1)
    pool.cache_block(bid, h(TOKENS_A), TOKENS_A)
    assert events.events == [("stored", [h(TOKENS_A)])]
    assert pool.cached_hashes() == [h(TOKENS_A)]


def test_eviction_emits_removed_with_the_evicted_hashes():
    pool = BlockPool(2)
    cached_free_block(pool, TOKENS_A)
    cached_free_block(pool, TOKENS_B)
    events = Recorder(pool)
    pool.allocate(2)
    assert events.events == [("removed", [h(TOKENS_A), h(TOKENS_B)])]


def test_block_already_cached_is_not_registered_again():
    pool = BlockPool(4)
    events = Recorder(pool)
    first, second = pool.allocate(2)
    pool.cache_block(first, h(TOKENS_A), TOKENS_A)
    pool.cache_block(second, h(TOKENS_A), TOKENS_A)  # same content computed twice
    pool.cache_block(first, h(TOKENS_B), TOKENS_B)
    assert pool.lookup(h(TOKENS_A), TOKENS_A) == first
    assert pool.blocks[second].block_hash is None
    assert pool.num_cached_blocks == 1
    assert events.events == [("stored", [h(TOKENS_A)])]


def test_reset_cache_forgets_free_cached_blocks_and_keeps_blocks_in_use():
    pool = BlockPool(4)
    cached_free_block(pool, TOKENS_A)
    cached_free_block(pool, TOKENS_B)
    (used,) = pool.allocate(1)
    pool.cache_block(used, h(TOKENS_C), TOKENS_C)
    events = Recorder(pool)
    assert pool.reset_cache() == 2
    assert sorted(events.events[0][1]) == sorted([h(TOKENS_A), h(TOKENS_B)])
    assert pool.lookup(h(TOKENS_A), TOKENS_A) is None
    assert pool.lookup(h(TOKENS_C), TOKENS_C) == used
    assert pool.num_free_blocks == 3
    assert sorted(pool.allocate(3)) == sorted({0, 1, 2, 3} - {used})
    assert pool.num_evictions == 0


def test_reset_cache_with_nothing_cached_emits_nothing():
    pool = BlockPool(4)
    events = Recorder(pool)
    assert pool.reset_cache() == 0
    assert events.events == []


def test_pool_without_caching_never_registers_blocks():
    pool = BlockPool(4, enable_caching=False)
    events = Recorder(pool)
    (bid,) = pool.allocate(1)
    pool.cache_block(bid, h(TOKENS_A), TOKENS_A)
    pool.free([bid])
    assert pool.lookup(h(TOKENS_A), TOKENS_A) is None
    assert events.events == []
