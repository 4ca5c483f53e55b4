"""The shared-memory side of bench_transfer.py: the decode node's local-transport copy and
the block tables it runs on (fresh, churned and random pools)."""
from __future__ import annotations

import random
from collections.abc import Callable

import torch

BLOCK_SIZE = 16


def shm_copy(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_ids: list[int], dst_ids: list[int],
             num_tokens: int) -> Callable[[], None]:
    """The decode node's local-transport copy: one KVCopyPlan for the request, then one
    copy_layer per layer (as each LocalChunk arrives)."""
    from pd.transport.kv_copy import KVCopyPlan

    def copy_request() -> None:
        plan = KVCopyPlan(src_ids, dst_ids, 0, num_tokens, BLOCK_SIZE)
        for layer in range(src_pool.shape[0]):
            plan.copy_layer(src_pool[layer], dst_pool[layer])

    return copy_request


def churned_table(num_blocks: int, need: int, seed: int) -> list[int]:
    """The block table a BlockPool (prefix caching on) hands out after a few hundred
    requests of 4-128 blocks came and went in random order, a quarter of it kept free."""
    from engine.kv_cache.block_pool import BlockPool

    rng, pool, live, next_hash = random.Random(seed), BlockPool(num_blocks), [], 0
    for _ in range(300):
        if live and (pool.num_free_blocks < num_blocks // 4 or rng.random() < 0.45):
            pool.free(list(reversed(live.pop(rng.randrange(len(live))))))  # tail first, as the engine does
            continue
        table = pool.allocate(min(rng.randint(4, 128), pool.num_free_blocks))
        for bid in table:
            next_hash += 1
            pool.cache_block(bid, next_hash, (next_hash,))
        live.append(table)
    while pool.num_free_blocks < need:
        pool.free(list(reversed(live.pop(0))))
    return pool.allocate(need)


def block_tables(num_tokens: int, num_src: int, num_dst: int) -> dict[str, tuple[list[int], list[int]]]:
    """Source and destination block tables: "fresh" = what BlockPools of freshly started
    nodes hand out, "churn" = after a long mixed workload, "random" = the worst case."""
    from engine.kv_cache.block_pool import BlockPool

    gen = torch.Generator().manual_seed(num_tokens)
    n = num_tokens // BLOCK_SIZE
    return {"fresh": (BlockPool(num_src).allocate(n), BlockPool(num_dst).allocate(n)),
            "churn": (churned_table(num_src, n, seed=1), churned_table(num_dst, n, seed=2)),
            "random": (torch.randperm(num_src, generator=gen)[:n].tolist(),
                       torch.randperm(num_dst, generator=gen)[:n].tolist())}
