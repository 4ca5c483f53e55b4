"""A request as the scheduler sees it: tokens, progress, status."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_cache.prefix_hash import chain_hashes
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 256           # resolved against max_model_len by the engine
    cache_salt: bytes = b""
    session_key: str | None = None  # keeps this conversation's KV resident after it finishes
    arrival_time: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. kv_transfer_params, session

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1     # prefix-cache hit at first scheduling (-1: not yet scheduled)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    _all_token_ids: list[int] = field(default_factory=list)
    _block_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the request's full blocks (extended lazily as tokens arrive)."""
        if len(self._block_hashes) < self.num_tokens // block_size:
            self._block_hashes = chain_hashes(self._all_token_ids, block_size, self.cache_salt,
                                              self._block_hashes)
        return self._block_hashes

    @property
    def finish_reason(self) -> str | None:
        if not self.is_finished:
            return None
        return self.status.value
