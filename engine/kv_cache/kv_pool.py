"""KV storage: one contiguous buffer for every layer's keys and values.

Layout: [num_layers, 2 (k, v), num_blocks * block_size, num_kv_heads, head_dim]. The pool
only knows bytes and a dtype, so it can live in process memory, in POSIX shared memory
(local PD transport) or on a GPU, and a future fp8 cache only changes `dtype`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)
_GIB = 1 << 30
DEFAULT_CPU_KV_GB = 1.0


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of one block's keys (or values) in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)


class KVPool:
    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu",
                 buffer: torch.Tensor | None = None):
        self.layout = layout
        if buffer is None:
            # zeroed, not empty: padded slots are masked out of attention, but a masked weight
            # of 0 times an uninitialized NaN bit pattern is still NaN
            self.data = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        else:
            if buffer.numel() * buffer.element_size() < layout.total_bytes:
                raise ValueError("KV buffer is smaller than the layout needs")
            flat = buffer.view(torch.uint8).reshape(-1)[:layout.total_bytes]
            self.data = flat.view(layout.dtype).view(layout.shape)

    def layer(self, i: int) -> torch.Tensor:
        """[2, slots, kv_heads, head_dim] view of layer i."""
        return self.data[i]

    def layers(self) -> list[torch.Tensor]:
        return [self.data[i] for i in range(self.layout.num_layers)]

    def blocks_view(self) -> torch.Tensor:
        """[layers, 2, num_blocks, block_size, kv_heads, head_dim] view for block transfers."""
        lay = self.layout
        return self.data.view(lay.num_layers, 2, lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)


def plan_num_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, max_model_len: int,
                    max_num_seqs: int, is_cuda: bool = False, free_cuda_bytes: int = 0) -> KVLayout:
    """Sizes the pool from the memory budget and the scheduler limits; logs one line."""
    probe = KVLayout(model.num_layers, 1, cache.block_size, model.num_kv_heads, model.head_dim, dtype)
    blocks_per_seq = -(-max_model_len // cache.block_size)
    if cache.num_blocks_override is not None:
        num_blocks = cache.num_blocks_override
    elif is_cuda:
        num_blocks = int(free_cuda_bytes * cache.kv_fraction) // probe.bytes_per_block
    else:
        budget = cache.kv_cache_gb if cache.kv_cache_gb is not None else DEFAULT_CPU_KV_GB
        by_budget = int(budget * _GIB) // probe.bytes_per_block
        # without an explicit budget, don't reserve more than the scheduler can ever use
        num_blocks = by_budget if cache.kv_cache_gb is not None else min(
            by_budget, blocks_per_seq * max_num_seqs + 1)
    if num_blocks < blocks_per_seq and cache.num_blocks_override is None:
        need = blocks_per_seq * probe.bytes_per_block / _GIB
        raise ValueError(
            f"the KV budget holds {num_blocks} blocks but one {max_model_len}-token sequence needs "
            f"{blocks_per_seq} ({need:.2f} GiB); raise --kv-cache-gb or lower --max-model-len")
    layout = KVLayout(model.num_layers, num_blocks, cache.block_size, model.num_kv_heads, model.head_dim, dtype)
    logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB (%s)", num_blocks, cache.block_size,
                num_blocks * cache.block_size, layout.total_bytes / _GIB, str(dtype).replace("torch.", ""))
    return layout
