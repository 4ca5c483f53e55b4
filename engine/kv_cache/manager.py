"""Per-request block tables on top of the block pool, with prefix-cache lookups."""
from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.session_cache import SessionHit
from engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.block_tables: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # full blocks already registered per request
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0     # tokens found

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks at the start of the request (at least one
        token is always left to compute, so the last position's logits exist)."""
        if not self.pool.enable_caching:
            return [], 0
        hashes = request.block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        hit: list[int] = []
        for i, h in enumerate(hashes[:max_blocks]):
            bid = self.pool.lookup(h, tokens[i * self.block_size:(i + 1) * self.block_size])
            if bid is None:
                break
            hit.append(bid)
        return hit, len(hit) * self.block_size

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def num_blocks_needed(self, request: Request, num_new_tokens: int, num_new_computed: int = 0) -> int:
        have = len(self.block_tables.get(request.request_id, ())) + num_new_computed // self.block_size
        total = request.num_computed_tokens + num_new_computed + num_new_tokens
        return max(0, -(-total // self.block_size) - have)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Reserves blocks for num_new_tokens more tokens (after any cache hits); returns the
        newly allocated block ids, or None (nothing changed) when blocks are short."""
        computed_blocks = computed_blocks or []
        need = self.num_blocks_needed(request, num_new_tokens, len(computed_blocks) * self.block_size)
        reviving = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_count == 0)
        if need + reviving > self.pool.num_free_blocks:
            return None
        table = self.block_tables.setdefault(request.request_id, [])
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table.extend(computed_blocks)
            self._num_cached_blocks[request.request_id] = len(table)
        new_blocks = self.pool.allocate(need) if need else []
        table.extend(new_blocks)
        return new_blocks

    def allocate_from_session(self, request: Request, hit: SessionHit, num_new_tokens: int
                              ) -> list[tuple[int, int]] | None:
        """Like allocate_slots, reusing a session's KV: its full blocks are shared and its
        partial last block is copied into a fresh one. Returns the (src, dst) block copies
        the runner must do before the forward pass, or None (nothing changed)."""
        full = hit.full_blocks(self.block_size)
        src, partial_tokens = hit.partial(self.block_size)
        total = len(full) * self.block_size + partial_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(full)
        reviving = sum(1 for b in full if self.pool.blocks[b].ref_count == 0)
        if request.request_id in self.block_tables or need + reviving > self.pool.num_free_blocks:
            return None
        self.pool.touch(full)
        new_blocks = self.pool.allocate(need)
        self.block_tables[request.request_id] = full + new_blocks
        self._num_cached_blocks[request.request_id] = len(full)
        return [(src, new_blocks[0])] if src is not None else []

    def release_for_session(self, request: Request) -> tuple[list[int], list[int]]:
        """Hands the blocks holding the request's computed tokens over to a session (their
        references move with them); frees the rest. Returns (token_ids, block_ids)."""
        table = self.block_tables.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        n = request.num_computed_tokens
        keep = -(-n // self.block_size)
        if table[keep:]:
            self.pool.free(reversed(table[keep:]))
        return request.all_token_ids[:n], table[:keep]

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's newly completed full blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        rid = request.request_id
        table = self.block_tables.get(rid)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        done = self._num_cached_blocks.get(rid, 0)
        if num_full <= done:
            return
        hashes = request.block_hashes(self.block_size)
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(done, min(num_full, len(hashes))):
            self.pool.cache_block(table[i], hashes[i], tokens[i * bs:(i + 1) * bs])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        table = self.block_tables.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def num_held_blocks(self) -> int:
        return sum(len(t) for t in self.block_tables.values())
