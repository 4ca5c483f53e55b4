"""POST /v1/chat/completions: messages -> engine requests -> a response or an SSE stream."""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.layers.sampler import TopLogprobs
from pd.decode.disconnect import until_disconnected
from pd.decode.generation import ChoiceState, collect_choices, merged_stream, seeded_copies
from pd.decode.state import NodeState
from pd.openai.errors import bad_request
from pd.openai.protocol import ChatCompletionRequest, random_id
from pd.openai.responses import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionChunkChoice,
                                 ChatCompletionResponse, ChatLogprobs, ChatLogprobToken, ChatResponseMessage,
                                 ChatTopLogprob, DeltaMessage, PromptTokensDetails, UsageInfo, sse_event)


async def create_chat_completion(state: NodeState, body: ChatCompletionRequest, api_key: str | None,
                                 raw: Request):
    state.check_model(body.model)
    state.check_capacity()
    messages = body.template_messages()
    session = state.sessions.open(api_key, body.session_id) if body.session_id else None
    conversation = state.sessions.full_conversation(session, messages) if session else messages
    try:
        prompt_text = state.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    except ValueError as exc:
        raise bad_request(f"could not apply the chat template: {exc}", param="messages") from None
    prompt_ids = (state.sessions.continue_tokens(session, prompt_text, state.tokenizer) if session else None) \
        or state.tokenizer.encode(prompt_text, add_special_tokens=False)
    params = body.to_sampling_params(None)
    extra = routing_hints(raw)
    requests = [state.make_request(prompt_ids, p, "messages",
                                   session_key=state.session_key(session) if i == 0 else None, extra=extra,
                                   api_key=api_key)
                for i, p in enumerate(seeded_copies(params, body.n))]
    turn = _SessionTurn(state, session, conversation, prompt_ids, prompt_text)
    if body.stream:
        return StreamingResponse(_stream(state, body, requests, turn), media_type="text/event-stream")
    choices = await until_disconnected(raw, collect_choices(state.engine, requests, state.metrics))
    turn.record(choices)
    return _response(state, body, choices, len(prompt_ids))


PREFILL_NODE_HEADER = "x-pd-prefill-node"


def routing_hints(raw: Request) -> dict:
    """A router may name the prefill node for this request ("none": prefill locally)."""
    node = raw.headers.get(PREFILL_NODE_HEADER)
    return {"prefill_node": node.strip()} if node else {}


class _SessionTurn:
    def __init__(self, state: NodeState, session, conversation, prompt_ids: list[int], prompt_text: str):
        self.state, self.session, self.conversation = state, session, conversation
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.num_prompt_tokens = len(prompt_ids)

    def record(self, choices: list[ChoiceState]) -> None:
        if self.session is None:
            return
        first = choices[0]
        ok = first.finish_reason in ("stop", "length")
        self.state.sessions.record_turn(
            self.session, self.conversation if ok else None, first.text if ok else None,
            self.num_prompt_tokens, sum(len(c.token_ids) for c in choices), first.num_cached_tokens)
        if ok:  # the exact tokens of this turn, so the next one continues them verbatim
            out = first.token_ids
            if first.finish_reason == "stop" and out and out[-1] in self.state.tokenizer.eos_token_ids:
                out = out[:-1]  # the template writes the end-of-turn token itself
            self.state.sessions.remember_tokens(self.session, self.prompt_text + first.text,
                                                self.prompt_ids + out)


def _response(state: NodeState, body: ChatCompletionRequest, choices: list[ChoiceState],
              num_prompt: int) -> ChatCompletionResponse:
    out = [ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                logprobs=chat_logprobs(state, c.logprobs) if body.logprobs else None,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in choices]
    return ChatCompletionResponse(model=state.model_name, choices=out, usage=usage(choices, num_prompt))


def usage(choices: list[ChoiceState], num_prompt: int) -> UsageInfo:
    completion = sum(len(c.token_ids) for c in choices)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion, total_tokens=num_prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=choices[0].num_cached_tokens))


async def _stream(state: NodeState, body: ChatCompletionRequest, requests, turn: _SessionTurn
                  ) -> AsyncIterator[str]:
    rid, created = random_id("chatcmpl-"), int(time.time())

    def chunk(choices, usage_info=None) -> str:
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=state.model_name,
                                             choices=choices, usage=usage_info))

    for i in range(len(requests)):
        yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    final: dict[int, ChoiceState] = {}
    async for choice, out in merged_stream(state.engine, requests, state.metrics):
        if out.finished and out.finish_reason == "error":
            yield error_event(out.error or "generation failed")
            return
        lp = chat_logprobs(state, out.logprobs) if body.logprobs and out.logprobs else None
        if out.new_text or lp or out.finished:
            yield chunk([ChatCompletionChunkChoice(
                index=choice.index, delta=DeltaMessage(content=out.new_text) if out.new_text else DeltaMessage(),
                logprobs=lp, finish_reason=out.finish_reason if out.finished else None,
                stop_reason=out.stop_reason if out.finished else None)])
        if out.finished:
            final[choice.index] = choice
    choices = [final[i] for i in range(len(requests))]
    turn.record(choices)
    if body.include_usage_in_stream:
        yield chunk([], usage(choices, turn.num_prompt_tokens))
    yield "data: [DONE]\n\n"


def error_event(message: str) -> str:
    import json
    return "data: " + json.dumps({"error": {"message": message, "type": "internal_error",
                                            "param": None, "code": None}}) + "\n\n"


def chat_logprobs(state: NodeState, entries: list[TopLogprobs]) -> ChatLogprobs:
    decode = state.tokenizer.decode
    content = []
    for e in entries:
        text = decode([e.token_id], skip_special_tokens=False)
        tops = [ChatTopLogprob(token=(t := decode([tid], skip_special_tokens=False)), logprob=lp,
                               bytes=list(t.encode()))
                for tid, lp in zip(e.top_ids, e.top_logprobs)]
        content.append(ChatLogprobToken(token=text, logprob=e.logprob, bytes=list(text.encode()),
                                        top_logprobs=tops))
    return ChatLogprobs(content=content)
