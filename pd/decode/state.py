"""Everything a request handler of the decode node needs, in one object."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request

from engine.async_engine import AsyncEngine
from engine.tokenizer import Tokenizer
from pd.decode.metrics import ServingMetrics
from pd.decode.sessions import SessionStore, cache_salt
from pd.openai.errors import OpenAIError, bad_request, not_found_model, overloaded, unauthorized


@dataclass
class NodeState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    metrics: ServingMetrics
    sessions: SessionStore = field(default_factory=SessionStore)
    api_keys: frozenset[str] = frozenset()
    max_waiting: int = 256
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    role: str = "decode"
    session_cache: bool = True  # keep a session's KV resident between turns

    def session_key(self, session) -> str | None:
        """The engine's session-cache key for a session (None: sessions only keep history)."""
        return session.engine_key if session is not None and self.session_cache else None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise not_found_model(name)

    def check_capacity(self) -> None:
        if self.draining:
            raise overloaded("the server is shutting down; retry on another node", 503)
        if not self.engine.is_running:
            raise overloaded("the engine is not running; retry later", 503)
        stats = self.engine.engine.stats()
        if stats.num_waiting + stats.num_waiting_remote >= self.max_waiting:
            raise overloaded(f"{stats.num_waiting} requests are already waiting; retry later", 429, 1.0)

    def authenticate(self, request: Request) -> str | None:
        """Returns the caller's API key (None when the server has none configured)."""
        if not self.api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if not any(secrets.compare_digest(token.strip(), k) for k in self.api_keys):
            raise unauthorized("invalid API key")
        return token.strip()

    def make_request(self, prompt_ids: list[int], params, param_name: str, api_key: str | None = None,
                     **kwargs):
        """Engine request for a prompt; user-caused problems become 400s naming `param_name`.
        Prefix-cache entries are salted per API key, so keys never share cached KV."""
        try:
            return self.engine.make_request(prompt_ids, params, cache_salt=cache_salt(api_key), **kwargs)
        except ValueError as exc:
            raise bad_request(str(exc), param=param_name) from None


__all__ = ["NodeState", "OpenAIError"]
