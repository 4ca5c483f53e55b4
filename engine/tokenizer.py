"""Tokenizer wrapper: a `tokenizers.Tokenizer` plus special tokens and the chat template."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer

from engine.chat_template import ChatTemplate


@dataclass(frozen=True)
class SpecialTokens:
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False


class Tokenizer:
    """Encodes, decodes and renders chat prompts; built by the GGUF and HF loaders."""

    def __init__(self, backend: HFTokenizer, special: SpecialTokens,
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = ()):
        self.backend = backend
        self.special = special
        self.bos_token_id = self._id_of(special.bos_token)
        self.eos_token_id = self._id_of(special.eos_token)
        ids = list(eos_token_ids)
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.insert(0, self.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)
        self.chat_template = ChatTemplate(chat_template, special) if chat_template else None
        self.all_special_ids = frozenset(
            tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.special.add_bos_token and self.bos_token_id is not None and (
                    not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            if self.special.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use the completions API with a raw prompt")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        # The template already places bos where the model wants it.
        return self.encode(text, add_special_tokens=False)

    def fingerprint(self) -> str:
        """Stable hash of the id -> token table (same for GGUF and tokenizer.json of one model)."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            h.update((self.backend.id_to_token(i) or "").encode() + b"\0")
        return h.hexdigest()[:16]
