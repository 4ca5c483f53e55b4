"""EngineBuilder: options -> loaded model, KV pool and a ready LLMEngine."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from engine.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig, parse_dtype
from engine.engine import LLMEngine
from engine.memory import huge_page_buffer, move_to_huge_pages, tune_malloc
from engine.kv_cache.kv_pool import KVPool, plan_num_blocks
from engine.kv_connector import KVConnector
from engine.loader.base import ModelSource
from engine.model_repo import ModelRepo
from engine.models.registry import build_model

logger = logging.getLogger(__name__)
MAX_DEFAULT_MODEL_LEN = 8192


class EngineBuilder:
    """Fluent options, then .build(): `EngineBuilder(ModelRepo.bundled()).dtype("float32").build()`."""

    def __init__(self, repo: ModelRepo | None = None):
        self.repo = repo or ModelRepo.bundled()
        self.device_cfg = DeviceConfig()
        self.cache_cfg = CacheConfig()
        self.sched_cfg = SchedulerConfig()
        self._connector: KVConnector | None = None
        self._kv_buffer: Callable[[int], torch.Tensor] | None = None

    def device(self, device: str) -> "EngineBuilder":
        self.device_cfg = dataclasses.replace(self.device_cfg, device=device)
        return self

    def dtype(self, dtype: str) -> "EngineBuilder":
        self.device_cfg = dataclasses.replace(self.device_cfg, dtype=dtype)
        return self

    def threads(self, n: int | None) -> "EngineBuilder":
        self.device_cfg = dataclasses.replace(self.device_cfg, num_threads=n)
        return self

    def cache(self, **kwargs: object) -> "EngineBuilder":
        """CacheConfig fields: block_size, kv_cache_gb, kv_fraction, num_blocks_override, enable_prefix_caching."""
        self.cache_cfg = dataclasses.replace(self.cache_cfg, **kwargs)
        return self

    def scheduler(self, **kwargs: object) -> "EngineBuilder":
        """SchedulerConfig fields: max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill."""
        self.sched_cfg = dataclasses.replace(self.sched_cfg, **kwargs)
        return self

    def max_model_len(self, n: int) -> "EngineBuilder":
        return self.scheduler(max_model_len=n)

    def max_num_seqs(self, n: int) -> "EngineBuilder":
        return self.scheduler(max_num_seqs=n)

    def kv_cache_gb(self, gb: float) -> "EngineBuilder":
        return self.cache(kv_cache_gb=gb)

    def connector(self, connector: KVConnector) -> "EngineBuilder":
        self._connector = connector
        return self

    def kv_buffer(self, factory: Callable[[int], torch.Tensor]) -> "EngineBuilder":
        """Places the KV pool in memory from factory(num_bytes), e.g. POSIX shared memory."""
        self._kv_buffer = factory
        return self

    def build_llm_engine(self) -> LLMEngine:
        t0 = time.perf_counter()
        if self.device_cfg.num_threads:
            torch.set_num_threads(self.device_cfg.num_threads)
        tune_malloc()  # MiB-sized host buffers (CPU activations, KV messages) reuse freed heap
        source = self.repo.open()
        dtype = self.device_cfg.resolve_dtype()
        device = self.device_cfg.torch_device
        model = load_model(source, dtype, device)
        max_len = self.sched_cfg.max_model_len or min(source.config.max_position_embeddings,
                                                       MAX_DEFAULT_MODEL_LEN)
        if max_len > source.config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's limit of "
                             f"{source.config.max_position_embeddings} positions")
        sched = dataclasses.replace(self.sched_cfg, max_model_len=max_len)
        config = EngineConfig(model=source.config, device=self.device_cfg, cache=self.cache_cfg,
                              scheduler=sched, max_model_len=max_len)
        kv_dtype = dtype if self.cache_cfg.kv_dtype == "auto" else parse_dtype(self.cache_cfg.kv_dtype)
        free = torch.cuda.mem_get_info()[0] if self.device_cfg.is_cuda else 0
        layout = plan_num_blocks(source.config, self.cache_cfg, kv_dtype, max_len, sched.max_num_seqs,
                                 self.device_cfg.is_cuda, free)
        if self._kv_buffer:
            buffer = self._kv_buffer(layout.total_bytes)
        else:
            buffer = huge_page_buffer(layout.total_bytes) if device.type == "cpu" else None
        engine = LLMEngine(model, source.tokenizer, config, KVPool(layout, device, buffer), self._connector)
        engine.model_description = source.description
        logger.info("engine ready: %s, %s, max_model_len %d, %.1f s", source.description,
                    str(dtype).replace("torch.", ""), max_len, time.perf_counter() - t0)
        return engine

    def build(self) -> "Engine":
        from engine.api import Engine
        return Engine(self.build_llm_engine())


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Builds the model and streams the weights in, one tensor at a time."""
    t0 = time.perf_counter()
    model = build_model(source.config, dtype, device)
    loaded = model.load_weights((name, t.to(dtype)) for name, t in source.open_weights())
    missing = model.expected_weight_names() - loaded
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    for module in model.modules():
        method = getattr(module, "method", None)
        if method is not None:
            method.finalize(module)
    if hasattr(model, "finalize"):
        model.finalize()
    if device.type == "cpu":
        move_to_huge_pages(model)  # the dense weights left (packed ones have their own memory)
    n = sum(p.numel() for p in model.parameters())
    logger.info("loaded %s: %s, %.1fM params, %s, %.1f s", source.config.architecture, source.description,
                n / 1e6, str(dtype).replace("torch.", ""), time.perf_counter() - t0)
    return model
