"""POST /v1/completions: prompt strings or token ids -> completions (legacy API)."""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.layers.sampler import TopLogprobs
from pd.decode.disconnect import until_disconnected
from pd.decode.generation import ChoiceState, collect_choices, merged_stream, seeded_copies
from pd.decode.serving_chat import error_event, routing_hints
from pd.decode.state import NodeState
from pd.openai.errors import bad_request
from pd.openai.protocol import CompletionRequest, random_id
from pd.openai.responses import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse,
                                 PromptTokensDetails, UsageInfo, sse_event)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API


async def create_completion(state: NodeState, body: CompletionRequest, api_key: str | None, raw: Request):
    state.check_model(body.model)
    state.check_capacity()
    prompts = body.prompts()
    prompt_ids = [_tokenize(state, p, i) for i, p in enumerate(prompts)]
    params = body.to_sampling_params(DEFAULT_MAX_TOKENS)
    session = state.sessions.open(api_key, body.session_id) if body.session_id else None
    requests, echoes = [], []
    for pi, ids in enumerate(prompt_ids):
        for ci, p in enumerate(seeded_copies(params, body.n)):
            key = state.session_key(session) if pi == 0 and ci == 0 else None
            requests.append(state.make_request(ids, p, "prompt", session_key=key, extra=routing_hints(raw),
                                               api_key=api_key))
            echoes.append(state.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else "")
    num_prompt = sum(len(ids) for ids in prompt_ids)
    if body.stream:
        return StreamingResponse(_stream(state, body, requests, echoes, num_prompt, session),
                                 media_type="text/event-stream")
    choices = await until_disconnected(raw, collect_choices(state.engine, requests, state.metrics))
    _record(state, session, choices, num_prompt)
    out = [CompletionChoice(index=c.index, text=echoes[c.index] + c.text, finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                            logprobs=legacy_logprobs(state, c.logprobs) if body.num_logprobs is not None else None)
           for c in choices]
    return CompletionResponse(model=state.model_name, choices=out, usage=_usage(choices, num_prompt))


def _tokenize(state: NodeState, prompt: str | list[int], index: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        return state.tokenizer.encode(prompt)
    vocab = state.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in prompt):
        raise bad_request(f"prompt[{index}] has token ids outside [0, {vocab})", param="prompt")
    return list(prompt)


def _usage(choices: list[ChoiceState], num_prompt: int) -> UsageInfo:
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(c.num_cached_tokens for c in choices)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion, total_tokens=num_prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=min(cached, num_prompt)))


def _record(state: NodeState, session, choices: list[ChoiceState], num_prompt: int) -> None:
    if session is not None:
        state.sessions.record_turn(session, None, None, num_prompt, sum(len(c.token_ids) for c in choices),
                                   choices[0].num_cached_tokens)


async def _stream(state: NodeState, body: CompletionRequest, requests, echoes: list[str], num_prompt: int,
                  session) -> AsyncIterator[str]:
    rid, created = random_id("cmpl-"), int(time.time())

    def chunk(choices, usage_info=None) -> str:
        return sse_event(CompletionChunk(id=rid, created=created, model=state.model_name, choices=choices,
                                         usage=usage_info))

    final: dict[int, ChoiceState] = {}
    echoed: set[int] = set()
    async for choice, out in merged_stream(state.engine, requests, state.metrics):
        if out.finished and out.finish_reason == "error":
            yield error_event(out.error or "generation failed")
            return
        text = out.new_text
        if choice.index not in echoed:
            echoed.add(choice.index)
            text = echoes[choice.index] + text
        lp = legacy_logprobs(state, out.logprobs) if body.num_logprobs is not None and out.logprobs else None
        if text or lp or out.finished:
            yield chunk([CompletionChoice(index=choice.index, text=text, logprobs=lp,
                                          finish_reason=out.finish_reason if out.finished else None,
                                          stop_reason=out.stop_reason if out.finished else None)])
        if out.finished:
            final[choice.index] = choice
    choices = [final[i] for i in range(len(requests))]
    _record(state, session, choices, num_prompt)
    if body.include_usage_in_stream:
        yield chunk([], _usage(choices, num_prompt))
    yield "data: [DONE]\n\n"


def legacy_logprobs(state: NodeState, entries: list[TopLogprobs]) -> CompletionLogprobs:
    decode = state.tokenizer.decode
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for e in entries:
        text = decode([e.token_id], skip_special_tokens=False)
        tokens.append(text)
        token_lps.append(e.logprob)
        tops.append({decode([t], skip_special_tokens=False): lp for t, lp in zip(e.top_ids, e.top_logprobs)})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)
