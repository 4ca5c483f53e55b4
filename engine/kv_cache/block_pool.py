"""Block pool: free lists, reference counts and the prefix-cache map of KV blocks.

A block is either in use (ref_count > 0) or free. A free block that still holds a full,
hashed block of tokens stays findable by its hash until it is reused (LRU order), so
a later request with the same prefix can take it back without recomputing. Blocks that
hold nothing worth keeping are handed out first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit


# Called with ("stored" | "removed", [block hashes]) so the router can track residency.
BlockEventListener = Callable[[str, list[int]], None]


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives 0 first
        self._free_cached: OrderedDict[int, None] = OrderedDict()           # LRU: oldest first
        self._by_hash: dict[int, int] = {}
        self.listeners: list[BlockEventListener] = []
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Takes n free blocks (plain ones first, then the least recently used cached ones),
        in ascending id order: blocks freed together then sit side by side in the table, so
        copies of a request's KV (PD transfers, swaps) move a few long runs of slots."""
        if n > self.num_free_blocks:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        ids: list[int] = []
        evicted: list[int] = []
        for _ in range(n):
            if self._free_plain:
                bid = self._free_plain.pop()
            else:
                bid, _ = self._free_cached.popitem(last=False)
                evicted.append(self._uncache(bid))
            self.blocks[bid].ref_count = 1
            ids.append(bid)
        if evicted:
            self.num_evictions += len(evicted)
            self._emit("removed", evicted)
        ids.sort()
        return ids

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """Block id holding exactly these tokens under this hash, or None."""
        bid = self._by_hash.get(block_hash)
        if bid is None or self.blocks[bid].token_ids != tuple(token_ids):
            return None
        return bid

    def touch(self, block_ids: Sequence[int]) -> None:
        """Takes a reference on blocks found in the cache (reviving free ones)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self._free_cached.pop(bid, None)
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference from each block; pass tail blocks first to evict them first."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {bid}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._free_cached[bid] = None
                else:
                    self._free_plain.append(bid)

    def cache_block(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> None:
        """Registers a full, computed block under its chained hash."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._by_hash:
            return  # already cached, or another block holds the same content
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._by_hash[block_hash] = block_id
        self._emit("stored", [block_hash])

    def reset_cache(self) -> int:
        """Forgets every free cached block; returns how many were dropped."""
        dropped = [self._uncache(bid) for bid in list(self._free_cached)]
        self._free_plain.extend(reversed(list(self._free_cached)))
        self._free_cached.clear()
        if dropped:
            self._emit("removed", dropped)
        return len(dropped)

    def cached_hashes(self) -> list[int]:
        return list(self._by_hash)

    def _uncache(self, block_id: int) -> int:
        block = self.blocks[block_id]
        h = block.block_hash
        del self._by_hash[h]
        block.block_hash = None
        block.token_ids = None
        return h

    def _emit(self, kind: str, hashes: list[int]) -> None:
        for listener in self.listeners:
            listener(kind, hashes)
