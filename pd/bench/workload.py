"""Request generation: seeded random prompts of a target token length, and multi-turn sessions.

Prompts are words from a fixed list. The first three words encode the request's index in a
per-seed shuffle of that list, so no two prompts of a run share a first token (no accidental
prefix-cache hits) unless a shared prefix is asked for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_TOKENS_PER_WORD = 1.3
DATASETS = ("random", "fixed", "multiturn")

_WORDS = tuple(dict.fromkeys("""
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy music market sense nation plan college
interest death experience effect class control care field development role effort rate heart
drug show leader light voice wife police mind price report decision son view relationship town
road arm difference value building action model season society tax director position player
record paper space ground form event official matter center couple site project activity star
table need court oil situation cost industry figure street image phone data picture practice
piece land product doctor wall patient worker news test movie north love support technology step
baby computer type attention film tree source organization hair window evidence population site
green blue red small large early young important public bad same able good new first last long
great little own other old right big high different next
""".split()))
_INDEX_WORDS = 3  # base len(_WORDS) digits: unique for len(_WORDS)**3 requests


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str = "random"
    num_requests: int = 64
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    shared_prefix_len: int = 0
    num_sessions: int = 16
    turns: int = 4
    send_history: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for name in ("num_requests", "input_len", "output_len", "num_sessions", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"--shared-prefix-len must be non-negative, got {self.shared_prefix_len}")

    @property
    def num_measured(self) -> int:
        return self.num_sessions * self.turns if self.dataset == "multiturn" else self.num_requests


@dataclass(frozen=True)
class BenchRequest:
    """One request as sent: chat messages (the completions endpoint joins them into a prompt)."""
    index: int
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    expected_prompt_tokens: int
    session_id: str | None = None
    turn: int | None = None


class TextFactory:
    """Seeded text of about `num_tokens` tokens, optionally made unique by an index prefix."""

    def __init__(self, rng: random.Random, tokens_per_word: float = DEFAULT_TOKENS_PER_WORD):
        if tokens_per_word <= 0:
            raise ValueError(f"tokens per word must be positive, got {tokens_per_word}")
        self.rng = rng
        self.tokens_per_word = tokens_per_word
        self.words = list(_WORDS)
        rng.shuffle(self.words)

    def text(self, num_tokens: int, unique_index: int | None = None) -> str:
        num_words = max(1, round(num_tokens / self.tokens_per_word))
        head = self._index_words(unique_index) if unique_index is not None else []
        body = self.rng.choices(self.words, k=max(0, num_words - len(head)))
        return " ".join(head + body)

    def estimate_tokens(self, text: str) -> int:
        return round(len(text.split()) * self.tokens_per_word)

    def _index_words(self, index: int) -> list[str]:
        base = len(self.words)
        return [self.words[(index // base ** k) % base] for k in range(_INDEX_WORDS)]


def sample_text(num_words: int, seed: int = 0) -> str:
    """Text drawn like the prompts, for measuring a server's tokens per word."""
    rng = random.Random(seed)
    return " ".join(rng.choices(_WORDS, k=num_words))


def draw_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return rng.randint(low, high)


def _system_messages(factory: TextFactory, num_tokens: int) -> tuple[dict[str, str], ...]:
    return ({"role": "system", "content": factory.text(num_tokens)},) if num_tokens else ()


def single_turn_requests(config: WorkloadConfig, tokens_per_word: float, count: int,
                         first_index: int = 0, stream: str = "main") -> list[BenchRequest]:
    """`count` independent requests; `stream` names an RNG stream (warm-up draws its own)."""
    factory = TextFactory(random.Random(f"{config.seed}:{stream}"), tokens_per_word)
    shared = _system_messages(TextFactory(random.Random(f"{config.seed}:shared"), tokens_per_word),
                              config.shared_prefix_len)
    ratio = 0.0 if config.dataset == "fixed" else config.range_ratio
    requests = []
    for index in range(first_index, first_index + count):
        input_len = draw_length(factory.rng, config.input_len, ratio)
        output_len = draw_length(factory.rng, config.output_len, ratio)
        messages = shared + ({"role": "user", "content": factory.text(input_len, index)},)
        requests.append(BenchRequest(index=index, messages=messages, max_tokens=output_len,
                                     expected_prompt_tokens=_estimate(factory, messages)))
    return requests


def _estimate(factory: TextFactory, messages: tuple[dict[str, str], ...]) -> int:
    return sum(factory.estimate_tokens(m["content"]) for m in messages)


class Session:
    """One conversation of fixed user turns; each turn is requested after the previous reply.

    With `send_history` the request carries the whole conversation so far; without it, only
    the new user message (plus the system prompt on turn 1), and the server is expected to
    keep the conversation under `session_id`.
    """

    def __init__(self, session_id: str, user_texts: list[str], output_lens: list[int],
                 system: tuple[dict[str, str], ...], send_history: bool, first_index: int,
                 factory: TextFactory):
        self.session_id = session_id
        self.user_texts = user_texts
        self.output_lens = output_lens
        self.system = system
        self.send_history = send_history
        self.first_index = first_index
        self.factory = factory
        self.history: list[dict[str, str]] = []
        self.num_done = 0

    @property
    def num_turns(self) -> int:
        return len(self.user_texts)

    @property
    def is_done(self) -> bool:
        return self.num_done == self.num_turns

    def next_request(self) -> BenchRequest:
        if self.is_done:
            raise RuntimeError(f"session {self.session_id} has no turns left")
        user = {"role": "user", "content": self.user_texts[self.num_done]}
        if self.send_history:
            messages = (*self.system, *self.history, user)
        else:
            messages = (*(self.system if self.num_done == 0 else ()), user)
        return BenchRequest(index=self.first_index + self.num_done, messages=messages,
                            max_tokens=self.output_lens[self.num_done],
                            expected_prompt_tokens=_estimate(self.factory, messages),
                            session_id=self.session_id, turn=self.num_done + 1)

    def record_reply(self, text: str) -> None:
        self.history += [{"role": "user", "content": self.user_texts[self.num_done]},
                         {"role": "assistant", "content": text}]
        self.num_done += 1


def make_sessions(config: WorkloadConfig, tokens_per_word: float) -> list[Session]:
    factory = TextFactory(random.Random(f"{config.seed}:sessions"), tokens_per_word)
    system = _system_messages(TextFactory(random.Random(f"{config.seed}:shared"), tokens_per_word),
                              config.shared_prefix_len)
    sessions = []
    for s in range(config.num_sessions):
        first = s * config.turns
        input_lens = [draw_length(factory.rng, config.input_len, config.range_ratio) for _ in range(config.turns)]
        user_texts = [factory.text(n, first + t) for t, n in enumerate(input_lens)]
        output_lens = [draw_length(factory.rng, config.output_len, config.range_ratio) for _ in range(config.turns)]
        sessions.append(Session(f"bench-{config.seed}-{s}", user_texts, output_lens, system,
                                config.send_history, first, factory))
    return sessions


def to_prompt(messages: tuple[dict[str, str], ...]) -> str:
    """Completions-endpoint prompt: plain text for one turn, a labelled transcript for several."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) <= 1:
        return "\n\n".join(m["content"] for m in messages)
    lines = [m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}"
             for m in messages]
    return "\n\n".join(lines + ["Assistant:"])


def poisson_gaps(rate: float, count: int, seed: int) -> list[float]:
    """Seconds to wait before each arrival: exponential gaps at `rate`/s, zeros when infinite."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(f"{seed}:arrivals")
    return [rng.expovariate(rate) for _ in range(count)]
