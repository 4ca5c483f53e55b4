"""Session context cache: a conversation's KV stays resident between turns.

When a request that belongs to a session finishes, its blocks are handed to the session
(the session holds their references), so the next turn, whose prompt starts with the
same tokens, reuses them down to the token, the partial last block included (copied on
write). Sessions are evicted least-recently-used when blocks run short.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from engine.kv_cache.block_pool import BlockPool

logger = logging.getLogger(__name__)


@dataclass
class Session:
    key: str
    token_ids: list[int]      # tokens whose KV is held in block_ids
    block_ids: list[int]      # one reference each, owned by the session
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class SessionHit:
    session: Session
    num_tokens: int           # reusable tokens (longest common prefix)

    def full_blocks(self, block_size: int) -> list[int]:
        return self.session.block_ids[:self.num_tokens // block_size]

    def partial(self, block_size: int) -> tuple[int | None, int]:
        """(source block, tokens) of the partial last block to copy, or (None, 0)."""
        n = self.num_tokens % block_size
        return (self.session.block_ids[self.num_tokens // block_size], n) if n else (None, 0)


class SessionCache:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.num_evicted = 0
        self.listeners: list[Callable[[str, str], None]] = []  # ("resident" | "evicted", key)

    def __contains__(self, key: str) -> bool:
        return key in self.sessions

    def get(self, key: str) -> Session | None:
        return self.sessions.get(key)

    def lookup(self, key: str, token_ids: list[int]) -> SessionHit | None:
        """The session's reusable prefix for these tokens (at least one token is left to compute)."""
        session = self.sessions.get(key)
        if session is None:
            return None
        limit = min(len(session.token_ids), len(token_ids) - 1)
        n = 0
        stored = session.token_ids
        while n < limit and stored[n] == token_ids[n]:
            n += 1
        return SessionHit(session, n) if n else None

    def store(self, key: str, token_ids: list[int], block_ids: list[int]) -> None:
        """Takes over one reference on each block (the caller gives its own up)."""
        old = self.sessions.pop(key, None)
        self.sessions[key] = Session(key, list(token_ids), list(block_ids))
        if old is not None:
            self.pool.free(reversed(old.block_ids))
        else:
            self._emit("resident", key)

    def touch(self, key: str) -> None:
        session = self.sessions.get(key)
        if session is not None:
            session.last_used = time.monotonic()
            self.sessions.move_to_end(key)

    def drop(self, key: str) -> bool:
        session = self.sessions.pop(key, None)
        if session is None:
            return False
        self.pool.free(reversed(session.block_ids))
        self._emit("evicted", key)
        return True

    def evict_lru(self, keep: str | None = None) -> bool:
        """Drops the least recently used session (other than `keep`); False if none."""
        for key in self.sessions:
            if key != keep:
                session = self.sessions[key]
                self.drop(key)
                self.num_evicted += 1
                logger.info("evicted session %s under KV pressure (%d tokens, %d blocks); %d blocks free",
                            key, len(session.token_ids), len(session.block_ids), self.pool.num_free_blocks)
                return True
        return False

    def _emit(self, kind: str, key: str) -> None:
        for listener in self.listeners:
            listener(kind, key)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(s.block_ids) for s in self.sessions.values())
