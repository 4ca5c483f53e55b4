"""What the engine reports for a request after a step."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.layers.sampler import TopLogprobs


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # matched stop string or stop token id
    logprobs: list[TopLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_remote: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    block_size: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks
