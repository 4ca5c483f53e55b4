"""OpenAI-compatible response models, with the field names of OpenAI's API.

Ids and `created` fill themselves in; streamed chunks go out with `sse_event(chunk)`
and the stream ends with `SSE_DONE`.
"""
from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal, Sequence

from pydantic import AfterValidator, BaseModel, Field, model_serializer

from pd.openai.protocol import random_id

SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def _clamp_logprob(value: float) -> float:
    return value if value >= _MIN_LOGPROB else _MIN_LOGPROB  # NaN clamps too


Logprob = Annotated[float, AfterValidator(_clamp_logprob)]


def _now() -> int:
    return int(time.time())


def sse_event(payload: BaseModel) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def encode_embedding(values: Sequence[float], encoding_format: str) -> list[float] | str:
    """"float" -> the list; "base64" -> little-endian float32 bytes in base64, as OpenAI sends."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return [float(v) for v in values]


# ---- usage ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int = 0,
           cached_tokens: int | None = None) -> UsageInfo:
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


# ---- logprobs ----

class ChatTopLogprob(BaseModel):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class ChatLogprobToken(BaseModel):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""
    tokens: list[str] = []
    token_logprobs: list[Logprob | None] = []
    top_logprobs: list[dict[str, Logprob] | None] = []
    text_offset: list[int] = []


# ---- chat ----

class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extension: the stop string or token id that matched


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """A streamed delta; unset fields are left out (`{"content": "Hi"}`), as OpenAI sends them."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]  # empty in the final usage-only chunk
    usage: UsageInfo | None = None


# ---- legacy completions ----

class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    """Streamed completions reuse object "text_completion", as OpenAI does."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- embeddings ----

class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---- models, tokenize ----

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pdserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = []


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
