"""Model runner: a scheduled batch -> flat tensors -> forward -> sampled tokens.

The runner sees requests only through their token ids and block tables; it never
touches the block pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.kv_cache.kv_pool import KVPool
from engine.kv_connector import KVConnector
from engine.layers.attention import AttentionMetadata, PrefillChunk, causal_mask_with_context
from engine.layers.sampler import Sampler, SamplingBatch, TopLogprobs
from engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TopLogprobs] = field(default_factory=dict)


@dataclass
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]                # flat-batch rows whose logits are sampled
    sample_reqs: list[ScheduledRequest]


class ModelRunner:
    def __init__(self, model: nn.Module, pool: KVPool, block_tables: dict[str, list[int]],
                 device: torch.device, connector: KVConnector | None = None):
        self.model = model
        self.pool = pool
        self.block_size = pool.layout.block_size
        self.block_tables = block_tables
        self.device = device
        self.kv_caches = pool.layers()
        self.dtype = next(model.parameters()).dtype
        self.connector = connector or KVConnector()
        self.sampler = Sampler()
        self.eos_token_ids: tuple[int, ...] = ()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        batch = self._prepare(out.scheduled)
        self.connector.on_step_start(out.scheduled)
        hook = self.connector.on_layer_done if self.connector.wants_layer_hooks else None
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, hook)
        result = RunnerOutput()
        if not batch.sample_rows:
            return result
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        reqs = [s.request for s in batch.sample_reqs]
        sampling = SamplingBatch(
            params=[r.params for r in reqs], generators=[r.generator for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            eos_token_ids=self.eos_token_ids)
        sampled = self.sampler(logits, sampling)
        for req, token, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
            result.sampled[req.request_id] = token
            if lp is not None:
                result.logprobs[req.request_id] = lp
        self.connector.on_step_done(result.sampled)
        return result

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies whole KV blocks src -> dst in every layer."""
        if copies:
            view = self.pool.blocks_view()
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            view[:, :, dst] = view[:, :, src]

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """Final hidden states [n, hidden] of one prompt written into `block_ids` (embeddings)."""
        req_slots = self._slots(block_ids, 0, len(token_ids))
        meta = AttentionMetadata(slot_mapping=req_slots, prefills=[PrefillChunk(0, len(token_ids), 0)])
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        return self.model(ids, positions, self.kv_caches, meta)

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def _prepare(self, scheduled: list[ScheduledRequest]) -> _Batch:
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_reqs: list[ScheduledRequest] = []
        decodes = [s for s in scheduled if s.is_decode]
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        if decodes:
            self._prepare_decodes(decodes, meta)
            for s in decodes:
                ids.append(s.request.all_token_ids[s.start])
                positions.append(s.start)
            slot_parts.append(meta.decode_slot_ids.gather(
                1, torch.tensor([[s.start] for s in decodes], device=self.device)).squeeze(1))
        for i, s in enumerate(decodes):
            if s.samples:
                sample_rows.append(i)
                sample_reqs.append(s)
        for s in scheduled:
            if s.is_decode:
                continue
            begin, end = s.start, s.start + s.num_new_tokens
            if s.samples:
                sample_rows.append(len(ids) + s.num_new_tokens - 1)
                sample_reqs.append(s)
            chunk = PrefillChunk(start=len(ids), num_tokens=s.num_new_tokens, context_len=begin)
            slots = self._slots(self.block_tables[s.request.request_id], 0, end)
            if begin:
                chunk.slot_ids = slots
                chunk.mask = causal_mask_with_context(s.num_new_tokens, begin).to(self.device)
            meta.prefills.append(chunk)
            slot_parts.append(slots[begin:])
            ids.extend(s.request.all_token_ids[begin:end])
            positions.extend(range(begin, end))
        meta.slot_mapping = torch.cat(slot_parts) if slot_parts else meta.slot_mapping
        return _Batch(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                      meta, sample_rows, sample_reqs)

    def _prepare_decodes(self, decodes: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        bs = self.block_size
        lens = torch.tensor([s.start + 1 for s in decodes])
        max_len = int(lens.max())
        max_blocks = -(-max_len // bs)
        table = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, s in enumerate(decodes):
            blocks = self.block_tables[s.request.request_id][:max_blocks]
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        pos = torch.arange(max_len)
        slots = table[:, pos // bs] * bs + pos % bs
        meta.num_decode_tokens = len(decodes)
        meta.decode_slot_ids = slots.to(self.device)
        if bool((lens != max_len).any()):
            meta.decode_mask = (pos.unsqueeze(0) < lens.unsqueeze(1)).view(len(decodes), 1, 1, max_len).to(self.device)
