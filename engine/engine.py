"""LLMEngine: the synchronous step loop (schedule -> run -> postprocess)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch
from torch import nn

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.kv_pool import KVPool
from engine.kv_cache.manager import KVCacheManager
from engine.kv_connector import KVConnector
from engine.layers.sampler import TopLogprobs, skip_draw
from engine.outputs import EngineStats, RequestOutput
from engine.request import Request, RequestStatus
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config: EngineConfig, pool: KVPool,
                 connector: KVConnector | None = None):
        self.model = model
        self.model_description = ""
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = config.max_model_len
        self.pool = pool
        self.connector = connector or KVConnector()
        self.block_pool = BlockPool(pool.layout.num_blocks, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.block_pool, pool.layout.block_size)
        self.scheduler = Scheduler(config.scheduler, self.max_model_len, self.kv, self.connector)
        self.runner = ModelRunner(model, pool, self.kv.block_tables, config.device.torch_device, self.connector)
        self.scheduler.copy_blocks = self.runner.copy_blocks
        eos = tuple(tokenizer.eos_token_ids) or tuple(config.model.eos_token_ids)
        self.eos_token_ids = eos
        self.runner.eos_token_ids = eos
        self.connector.register_kv_pool(pool, self.kv.block_tables)
        self._detoks: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     cache_salt: bytes = b"", session_key: str | None = None,
                     extra: dict[str, Any] | None = None) -> Request:
        """Validates a prompt against the limits and builds the Request (without queuing it)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but this model's maximum context length is "
                             f"{self.max_model_len} tokens (prompt plus at least one generated token); "
                             "shorten the prompt")
        vocab = self.config.model.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return Request(request_id or self.new_request_id(), list(prompt_token_ids), params,
                       eos_token_ids=self.eos_token_ids, max_tokens=max_tokens, cache_salt=cache_salt,
                       session_key=session_key, extra=dict(extra or {}))

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)  # raises for a duplicate id before any state changes
        self._detoks[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, request.params)

    def abort_request(self, request_id: str) -> bool:
        req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._detoks.pop(request_id, None)
        return req is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        for req, result in self.scheduler.remote_results:
            if req.generator is not None and not req.params.is_greedy:
                skip_draw(req.generator, self.config.model.vocab_size)  # the prefill node drew it
            lps = [result.first_logprobs] if result.first_logprobs else []
            outputs.append(self._emit(req, [req.output_token_ids[-1]], lps))
        self.scheduler.remote_results.clear()
        for req in self.scheduler.errored:
            self._detoks.pop(req.request_id, None)
            outputs.append(RequestOutput(req.request_id, [], "", finished=True, finish_reason="error",
                                         num_prompt_tokens=req.num_prompt_tokens, error=req.extra.get("error")))
        self.scheduler.errored.clear()
        if out.is_empty:
            return outputs
        now = time.monotonic()
        for s in out.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        result = self.runner.execute(out)
        for req in self.scheduler.update_from_output(out, result.sampled):
            lp = result.logprobs.get(req.request_id)
            outputs.append(self._emit(req, [req.output_token_ids[-1]], [lp] if lp else []))
        return outputs

    def _emit(self, req: Request, token_ids: list[int], logprobs: list[TopLogprobs]) -> RequestOutput:
        detok = self._detoks[req.request_id]
        text, stop = detok.add_tokens(token_ids)
        if stop is not None:
            req.stop_reason = stop
            if req.is_finished:  # the same token also hit a limit: the stop string wins
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        elif req.is_finished:
            text += detok.flush()
        if req.is_finished:
            del self._detoks[req.request_id]
        return RequestOutput(
            request_id=req.request_id, new_token_ids=token_ids, new_text=text, finished=req.is_finished,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0))

    # ---- introspection -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_waiting_remote=len(s.remote),
            num_blocks=self.block_pool.num_blocks, num_free_blocks=self.block_pool.num_free_blocks,
            num_cached_blocks=self.block_pool.num_cached_blocks, block_size=self.kv.block_size,
            prefix_queries=self.kv.prefix_queries, prefix_hits=self.kv.prefix_hits,
            num_preemptions=s.num_preemptions)

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Final hidden states [n, hidden] (model dtype) of a prompt; uses scratch KV blocks.
        Call from the thread that steps the engine (AsyncEngine.call does)."""
        if not token_ids or len(token_ids) > self.max_model_len:
            raise ValueError(f"input must have 1 to {self.max_model_len} tokens, got {len(token_ids)}")
        n_blocks = -(-len(token_ids) // self.kv.block_size)
        if n_blocks > self.block_pool.num_free_blocks:
            raise MemoryError("not enough free KV blocks for this input right now; retry later")
        blocks = self.block_pool.allocate(n_blocks)
        try:
            return self.runner.hidden_states(token_ids, blocks)
        finally:
            self.block_pool.free(blocks)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, vocab] (float32) of every position of a prompt (prompt scoring)."""
        return self.model.compute_logits(self.embed(token_ids))
