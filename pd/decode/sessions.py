"""Server-side session state: conversation history and token usage per (API key, session_id).

The KV of a session lives in the engine's session cache under `engine_key`; this store
keeps what the HTTP layer needs so a client may send only the new messages of a turn.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_SESSIONS = 10_000


def key_namespace(api_key: str | None) -> str:
    """Short stable id of an API key: sessions of different keys never share a namespace."""
    if not api_key:
        return "anon"
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def cache_salt(api_key: str | None) -> bytes:
    """Prefix-cache salt of an API key (b"" without keys): the first block hash of every
    request includes it, so requests of different keys never hit each other's blocks."""
    return key_namespace(api_key).encode() if api_key else b""


@dataclass
class SessionState:
    engine_key: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""                 # rendered prompt + answer of the last turn ...
    token_ids: list[int] = field(default_factory=list)  # ... and exactly the tokens the engine saw
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    turns: int = 0
    last_used: float = field(default_factory=time.time)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class SessionStore:
    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def engine_key(api_key: str | None, session_id: str) -> str:
        return f"{key_namespace(api_key)}:{session_id}"

    def get(self, api_key: str | None, session_id: str) -> SessionState | None:
        with self._lock:
            return self._sessions.get(self.engine_key(api_key, session_id))

    def open(self, api_key: str | None, session_id: str) -> SessionState:
        key = self.engine_key(api_key, session_id)
        with self._lock:
            state = self._sessions.get(key)
            if state is None:
                state = self._sessions[key] = SessionState(key)
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(key)
            state.last_used = time.time()
            return state

    @staticmethod
    def full_conversation(state: SessionState, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages to render: as sent when they repeat the stored history, else history + new."""
        history = state.messages
        if not history or messages[:len(history)] == history:
            return messages
        return history + messages

    def remember_tokens(self, state: SessionState, text: str, token_ids: list[int]) -> None:
        with self._lock:
            state.text, state.token_ids = text, list(token_ids)

    @staticmethod
    def continue_tokens(state: SessionState, prompt_text: str, tokenizer) -> list[int] | None:
        """Token ids of a new turn that extend the previous turn's tokens verbatim (so its
        cached KV matches to the last token), or None when the text does not continue it.
        Re-tokenizing the previous answer could split it differently than it was generated."""
        if not state.token_ids or not prompt_text.startswith(state.text):
            return None
        return state.token_ids + tokenizer.encode(prompt_text[len(state.text):], add_special_tokens=False)

    def record_turn(self, state: SessionState, conversation: list[dict[str, Any]] | None, answer: str | None,
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            if conversation is not None and answer is not None:
                state.messages = conversation + [{"role": "assistant", "content": answer}]
            state.prompt_tokens += prompt_tokens
            state.completion_tokens += completion_tokens
            state.cached_tokens += cached_tokens
            state.turns += 1
            state.last_used = time.time()
