"""Runs the engine requests of one HTTP call (n choices, several prompts) as one merged stream."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.request import Request
from pd.decode.metrics import ServingMetrics
from pd.openai.errors import internal_error


@dataclass
class ChoiceState:
    """What one choice has produced so far, plus its timing for the metrics."""

    index: int
    request: Request
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    error: str | None = None


async def merged_stream(engine: AsyncEngine, requests: list[Request], metrics: ServingMetrics | None
                        ) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
    """Yields (choice, output) as outputs of any of the requests arrive; aborts all on exit."""
    states = [ChoiceState(i, r) for i, r in enumerate(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    start = time.monotonic()

    async def pump(state: ChoiceState) -> None:
        try:
            async for out in engine.generate(state.request):
                await queue.put((state, out))
        except Exception as exc:  # engine died: surface as an error output
            await queue.put((state, RequestOutput(state.request.request_id, [], "", finished=True,
                                                  finish_reason="error", error=str(exc))))

    tasks = [asyncio.create_task(pump(s)) for s in states]
    remaining = len(states)
    try:
        while remaining:
            state, out = await queue.get()
            _update(state, out, metrics, start)
            if out.finished:
                remaining -= 1
            yield state, out
    finally:
        for t in tasks:
            t.cancel()  # a cancelled pump leaves engine.generate early, which aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(engine: AsyncEngine, requests: list[Request], metrics: ServingMetrics | None
                          ) -> list[ChoiceState]:
    """Runs the requests to the end; their final states in order (500 if any failed)."""
    choices: dict[int, ChoiceState] = {}
    async for choice, _ in merged_stream(engine, requests, metrics):
        choices[choice.index] = choice
    result = [choices[i] for i in range(len(requests))]
    for c in result:
        if c.finish_reason == "error":
            raise internal_error(c.error or "generation failed")
    return result


def _update(state: ChoiceState, out: RequestOutput, metrics: ServingMetrics | None, start: float) -> None:
    now = time.monotonic()
    state.text += out.new_text
    state.token_ids.extend(out.new_token_ids)
    state.logprobs.extend(out.logprobs)
    state.num_prompt_tokens = out.num_prompt_tokens
    state.num_cached_tokens = out.num_cached_tokens
    if out.new_token_ids:
        if state.first_token_time is None:
            state.first_token_time = now
            if metrics:
                metrics.ttft.observe(now - start)
                req = state.request
                if req.first_scheduled_time is not None:
                    metrics.queue.observe(max(0.0, req.first_scheduled_time - req.arrival_time))
        elif metrics and state.last_token_time is not None:
            metrics.itl.observe(now - state.last_token_time)
        state.last_token_time = now
    if out.finished:
        state.finish_reason = out.finish_reason
        state.stop_reason = out.stop_reason
        state.error = out.error
        if metrics:
            metrics.e2e.observe(now - start)
            metrics.prompt_tokens.inc(out.num_prompt_tokens)
            metrics.generation_tokens.inc(len(state.token_ids))
            metrics.finished(out.finish_reason or "unknown")


def seeded_copies(params, n: int) -> list:
    """n sampling params for n choices: a given seed becomes seed, seed+1, ... so choices differ."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i) % 2**64) for i in range(n)]
