"""OpenAI-compatible request models (chat, completions, embeddings, tokenize).

Unknown fields are ignored, as vLLM does; `null` for an optional field means "use the
default". Features the engine lacks (tools, JSON mode, suffix, dimensions) are refused
with a 400 rather than silently ignored.
"""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from engine.sampling_params import SamplingParams
from pd.openai.errors import bad_request

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5


def random_id(prefix: str) -> str:
    """A fresh OpenAI-style id, e.g. random_id("chatcmpl-") -> "chatcmpl-3f2a...". """
    return f"{prefix}{uuid.uuid4().hex}"


def _invalid(message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message, ctx or None)


def _unsupported(message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message, ctx or None)


# ---- prompts and token ids ----

PromptInput = str | list[str] | list[int] | list[list[int]]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate_prompt_input(value: Any) -> PromptInput:
    """One text, a batch of texts, one token-id list, or a batch of token-id lists; none empty."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) and v for v in value):
            return value
        if all(_is_token_id(v) for v in value):
            return value
        if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
            return value
    raise _invalid("must be a non-empty string, a list of non-empty strings, a list of "
                   "non-negative token ids, or a list of non-empty token-id lists")


def _as_batch(value: PromptInput) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


Prompt = Annotated[PromptInput, BeforeValidator(_validate_prompt_input)]
TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]


def _str_to_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# ---- chat messages ----

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextContentPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageContentPart(BaseModel):
    """Accepted by the schema so a request can carry it; the text-only engine refuses it."""
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = TextContentPart | ImageContentPart
MessageContent = str | list[ContentPart] | None


def _validate_part(part: Any, index: int) -> ContentPart:
    if isinstance(part, (TextContentPart, ImageContentPart)):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return TextContentPart(text=part["text"])
    image = part.get("image_url") if kind == "image_url" else None
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        return ImageContentPart(image_url=ImageURL(url=image["url"], detail=image.get("detail")))
    raise _invalid("part {index} must be a text part (type 'text' with a string 'text') or an image "
                   "part (type 'image_url' with an 'image_url' object holding a string 'url')", index=index)


def _validate_content(value: Any) -> MessageContent:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        return [_validate_part(part, i) for i, part in enumerate(value)]
    raise _invalid("must be a string, a non-empty list of content parts, or null")


Content = Annotated[MessageContent, BeforeValidator(_validate_content)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _invalid("content may be null only in an assistant message with tool_calls")
        return self

    @property
    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)

    def text(self) -> str | None:
        """The content as one string: text parts joined by newlines (image parts must be absent)."""
        if not isinstance(self.content, list):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextContentPart))

    def to_template_dict(self, index: int) -> dict[str, Any]:
        """The message as a chat template expects it; 400 for image parts (text-only engine)."""
        if self.has_image:
            raise bad_request("image inputs are not supported by this server; send text content only",
                              param=f"messages[{index}].content")
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise _unsupported("'{kind}' is not supported; only 'text' is", kind=value)
        return value


# ---- requests ----

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required()}


class _GenerationRequest(_Request):
    """Fields shared by chat and legacy completions: streaming, sampling, routing."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] = []
    stop_token_ids: list[TokenId] = []
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    session_id: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return _str_to_list(value)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if not info.data.get("stream"):
            raise _invalid("stream_options is only allowed when stream is true")
        return value

    @field_validator("session_id")
    @classmethod
    def _session_id_charset(cls, value: str) -> str:
        if not all(c.isascii() and (c.isalnum() or c in "._:-") for c in value):
            raise _invalid("may contain only ASCII letters, digits, '.', '_', ':' and '-'")
        return value

    @model_validator(mode="after")
    def _min_tokens_fit(self) -> _GenerationRequest:
        limit = self.requested_max_tokens
        if limit is not None and self.min_tokens > limit:
            raise _invalid("min_tokens ({min_tokens}) must not exceed max_tokens ({limit})",
                           min_tokens=self.min_tokens, limit=limit)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token; None = no logprobs."""
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """Engine parameters for one choice.

        `default_max_tokens` applies when the client set no limit (typically what is left of
        the context); checking the limit against the prompt length is the caller's job.
        """
        max_tokens = self.requested_max_tokens
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed, stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=self.num_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise _invalid("top_logprobs needs logprobs set to true")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if value:
            raise _unsupported("tools are not supported by this server; send the request without tools")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if value not in ("none", "auto"):
            raise _unsupported("only 'none' and 'auto' are accepted, as tools are not supported by this server")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    @property
    def has_image(self) -> bool:
        return any(m.has_image for m in self.messages)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template; raises a 400 OpenAIError for image content."""
        return [m.to_template_dict(i) for i, m in enumerate(self.messages)]


class CompletionRequest(_GenerationRequest):
    """Legacy /v1/completions. OpenAI's default max_tokens here is 16; the caller picks the default."""

    prompt: Prompt
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str) -> str:
        if value:
            raise _unsupported("suffix is not supported by this server")
        return value

    @model_validator(mode="after")
    def _no_prompt_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise _unsupported("echo with logprobs is not supported (prompt logprobs are not computed)")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: each item one text or one token-id list."""
        return _as_batch(self.prompt)


class EmbeddingRequest(_Request):
    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    embedding_type: Literal["mean", "last"] = "mean"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int) -> int:
        raise _unsupported("dimensions is not supported; embeddings have the model's full size")

    def inputs(self) -> list[str | list[int]]:
        """The input as a batch: each item one text or one token-id list."""
        return _as_batch(self.input)


class TokenizeRequest(_Request):
    """Either `prompt` (plain text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _invalid("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]
