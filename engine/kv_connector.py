"""The seam through which KV moves between engines (prefill node -> decode node).

One interface with two halves, after vLLM v1's connector:
- scheduler side: how many prompt tokens can come from elsewhere, what to do once
  blocks are allocated for them, and whether a finished request's blocks must stay
  alive a little longer (while they are being sent);
- worker side: register the KV pool, hear about each layer as the forward pass
  finishes it (to stream KV out), and report transfers that completed or failed.

The engine never imports a transport: a transport is one implementation of this class,
handed to the engine by whoever builds it (the pd package).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.kv_cache.kv_pool import KVPool
    from engine.layers.sampler import TopLogprobs
    from engine.request import Request
    from engine.scheduler import ScheduledRequest


@dataclass
class RemotePrefillResult:
    """A finished remote load: the KV is in the request's blocks; the first token is known."""

    first_token_id: int
    first_logprobs: "TopLogprobs | None" = None
    num_remote_cached_tokens: int = 0


@dataclass
class FinishedTransfers:
    loaded: dict[str, RemotePrefillResult] = field(default_factory=dict)  # req id -> result
    load_failed: dict[str, str] = field(default_factory=dict)   # req id -> reason; recompute locally
    load_errors: dict[str, str] = field(default_factory=dict)   # req id -> reason; fail the request
    sent: set[str] = field(default_factory=set)                 # delayed frees that may happen now


class KVConnector:
    """Default: no remote KV. Subclasses override the hooks they need."""

    # ---- scheduler side -------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> int:
        """Prompt tokens beyond num_computed_tokens that will be loaded from a remote node
        asynchronously (0 = compute locally). Asked each step until the request is admitted."""
        return 0

    def update_state_after_alloc(self, request: "Request", block_ids: list[int],
                                 num_external_tokens: int) -> None:
        """Blocks for the remote tokens are allocated: start fetching into them."""

    def request_finished(self, request: "Request", block_ids: list[int]) -> bool:
        """Returns True to keep the request's blocks until get_finished() lists it as sent."""
        return False

    def abort_load(self, request: "Request") -> None:
        """The request ended (e.g. client gone) while its KV was still being loaded."""

    # ---- worker side ----------------------------------------------------------------
    def register_kv_pool(self, pool: "KVPool", block_tables: dict[str, list[int]]) -> None:
        """Called once at start-up with the engine's KV storage and its live block tables
        (request id -> block ids; read-only for the connector, owned by the engine thread)."""

    def on_step_start(self, scheduled: "list[ScheduledRequest]") -> None:
        """Called before each forward pass with the requests and token ranges it computes."""

    def on_layer_done(self, layer_index: int) -> None:
        """Called by the runner after each layer of each forward pass (stream KV out here)."""

    def on_step_done(self, sampled: dict[str, int]) -> None:
        """Called after each forward pass with the token sampled for each request."""

    def get_finished(self) -> FinishedTransfers:
        return FinishedTransfers()

    @property
    def wants_layer_hooks(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"kind": "none"}
