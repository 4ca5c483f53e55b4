"""Incremental detokenizer: streams text deltas for one request and finds stop strings."""
from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas that concatenate to a full decode.

    Uses the prefix/read-offset technique: each step decodes only the window of ids since
    the previous emission (so a call costs O(new tokens)) and emits the text it adds, holding
    text back while it ends in an incomplete UTF-8 character. `tokenizers`' DecodeStream uses
    the same technique but raises on invalid byte-fallback sequences and cannot flush.
    Text that could still become a stop string is held back until it cannot. The first stop
    string to complete ends the text; among several completed by one call, the earliest.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        # prompt_token_ids are not decoded: output text equals a decode of the output ids alone.
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = params.stop
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._include_stop = params.include_stop_str_in_output
        self._ids: list[int] = []
        self._prefix_offset = 0   # window start: decoded again each step for context
        self._read_offset = 0     # ids before this have been turned into text
        self._prefix_text = ""    # decode(ids[prefix_offset:read_offset])
        self._held = ""           # decoded text not yet emitted: it may start a stop string
        self._chunks: list[str] = []
        self._matched_stop: str | None = None
        self._is_finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._matched_stop

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def add_tokens(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Adds new output ids; returns (text safe to emit now, matched stop string or None)."""
        if self._is_finished or not token_ids:
            return "", None
        self._ids.extend(token_ids)
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At finish: returns the held-back text (incomplete bytes decode to U+FFFD)."""
        if self._is_finished:
            return ""
        text, _ = self._emit(self._decode_new(final=True), final=True)
        self._is_finished = True
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text added by ids[read_offset:], or "" while it ends in an incomplete character."""
        end = len(self._ids)
        if self._read_offset == end:
            return ""
        text = self._decode(self._ids[self._prefix_offset:end])
        if not final:
            # Several new ids: emit up to the last one that ends a character (at most 3 back).
            lowest_end = max(self._read_offset + 1, end - 3)
            while text.endswith(_REPLACEMENT_CHAR) and end > lowest_end:
                end -= 1
                text = self._decode(self._ids[self._prefix_offset:end])
            if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
                return ""
        new_text = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return new_text

    def _emit(self, new_text: str, final: bool) -> tuple[str, str | None]:
        """Appends new text to the held text; emits what cannot be part of a stop string."""
        buf = self._held + new_text
        match = self._find_stop(buf)
        if match is not None:
            start, stop = match
            out = buf[:start + len(stop)] if self._include_stop else buf[:start]
            self._held = ""
            self._matched_stop = stop
            self._is_finished = True
            self._chunks.append(out)
            return out, stop
        keep = 0 if final else self._partial_stop_len(buf)
        out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if out:
            self._chunks.append(out)
        return out, None

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        """Earliest stop string in buf (ties go to the one listed first)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start != -1 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self._max_stop_len - 1), 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
