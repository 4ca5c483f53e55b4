"""Chat templates rendered exactly the way transformers renders them.

The Jinja environment mirrors `transformers.utils.chat_template_utils`: a sandboxed,
immutable environment with trim_blocks/lstrip_blocks, the loopcontrols extension, a
no-op `{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson` filter that
keeps non-ASCII text and honours `indent`, and a restricted `dict` / `namespace`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:  # engine.tokenizer imports this module
    from engine.tokenizer import SpecialTokens

# Names a message's reasoning may come under; templates read `reasoning_content`
# (and gpt-oss style templates `thinking`), as transformers aliases them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(jinja2.TemplateError):
    """Raised by the template itself through `raise_exception(message)`."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """A deep copy made of plain JSON-like types, so the template never sees (or edits) caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _join_text_parts(parts: Sequence[Any], role: Any) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise ValueError(
                f"content part of type {kind!r} in a {role!r} message is not supported by this model; "
                "send text parts only")
        texts.append(part.get("text") or "")
    return "\n".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-data copies of `messages` with list content (OpenAI content parts) joined to a string.

    Text parts are joined with "\\n"; any other part type raises ValueError. Every model
    served here is text-only, and text-only templates expect string content (some, like
    Qwen3's, silently render an empty string for a list), so joining is always applied.
    Reasoning given as `reasoning` or `thinking` is also exposed as `reasoning_content`.
    """
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        message = _plain(message)
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            message["content"] = _join_text_parts(content, message.get("role"))
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, template: str, special: SpecialTokens):
        self.source = template
        self.special = special
        try:
            self._compiled = _make_environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template is invalid (line {e.lineno}: {e.message}); "
                             "fix the template or pass a different one") from None
        self._special_vars = {
            name: value for name, value in (
                ("bos_token", special.bos_token), ("eos_token", special.eos_token),
                ("pad_token", special.pad_token), ("unk_token", special.unk_token))
            if value is not None}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """Render a conversation to prompt text; extra kwargs (e.g. enable_thinking) reach the template."""
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ValueError("documents must be a list of objects with 'title' and 'text' keys")
        variables = {**self._special_vars, **_plain(kwargs)}
        try:
            return self._compiled.render(
                messages=normalize_messages(messages), tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **variables)
        except _TemplateRaised as e:
            raise ValueError(e.message) from None
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"chat template failed to render: {e}; check the messages' roles "
                             "and fields against what this model's template expects") from None
