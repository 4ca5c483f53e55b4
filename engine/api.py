"""Library API: build an engine and generate, one request, a batch, or streaming.

    from engine.api import EngineBuilder, ModelRepo, SamplingParams
    engine = EngineBuilder(ModelRepo.bundled()).build()
    result = engine.generate(SamplingParams(max_tokens=64), [{"role": "user", "content": "Hi"}])
    print(result.text, result.usage)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from engine.async_engine import AsyncEngine
from engine.builder import EngineBuilder
from engine.engine import LLMEngine
from engine.layers.sampler import TopLogprobs
from engine.model_repo import ModelRepo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineBuilder", "ModelRepo", "SamplingParams", "GenerationResult", "Usage",
           "AsyncEngine", "StreamChunk"]

Messages = Sequence[dict[str, Any]]
Prompt = "str | list[int] | Messages"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    stop_reason: int | str | None = None
    logprobs: list[TopLogprobs] = field(default_factory=list)


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


class Engine:
    """Synchronous facade over LLMEngine for scripts and notebooks."""

    def __init__(self, llm: LLMEngine):
        self.llm = llm
        self.tokenizer = llm.tokenizer

    def encode_prompt(self, prompt: "Prompt") -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], int):
            return list(prompt)  # type: ignore[arg-type]
        return self.tokenizer.encode_chat(list(prompt))  # type: ignore[arg-type]

    def generate(self, params: SamplingParams, messages: "Prompt") -> GenerationResult:
        """One request: chat messages, a raw prompt string, or token ids."""
        return self.generate_batch([(params, messages)])[0]

    def generate_batch(self, requests: Sequence[tuple[SamplingParams, "Prompt"]]) -> list[GenerationResult]:
        """Many requests batched together; results in input order."""
        ids = [self._submit(p, m) for p, m in requests]
        results: dict[str, GenerationResult] = {
            rid: GenerationResult("", [], None, Usage(0, 0)) for rid in ids}
        while self.llm.has_unfinished_requests():
            for out in self.llm.step():
                _accumulate(results[out.request_id], out)
        return [results[rid] for rid in ids]

    def stream(self, params: SamplingParams, messages: "Prompt") -> Iterator[StreamChunk]:
        rid = self._submit(params, messages)
        try:
            while self.llm.has_unfinished_requests():
                for out in self.llm.step():
                    if out.request_id == rid:
                        yield StreamChunk(out.new_text, out.new_token_ids, out.finished, out.finish_reason)
                        if out.finished:
                            return
        finally:
            self.llm.abort_request(rid)

    def async_engine(self) -> AsyncEngine:
        """A background-loop engine over the same model (don't mix with the sync calls)."""
        return AsyncEngine(self.llm)

    def _submit(self, params: SamplingParams, prompt: "Prompt") -> str:
        req = self.llm.make_request(self.encode_prompt(prompt), params)
        self.llm.add_request(req)
        return req.request_id


def _accumulate(result: GenerationResult, out: RequestOutput) -> None:
    result.text += out.new_text
    result.token_ids.extend(out.new_token_ids)
    result.logprobs.extend(out.logprobs)
    result.usage = Usage(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
    if out.finished:
        result.finish_reason = out.finish_reason
        result.stop_reason = out.stop_reason
