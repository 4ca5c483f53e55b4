"""ChatTemplate renders exactly what transformers' apply_chat_template renders."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from engine.chat_template import ChatTemplate, normalize_messages
from engine.tokenizer import SpecialTokens
from tiny_models import CHATML_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, build_hf_tokenizer

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3-style thinking switch, a namespace, a {% generation %} block and tojson with indent.
FEATURES_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% set ns.count = ns.count + 1 %}
    {% if message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
    {% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
messages: {{ ns.count }}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{% endif %}"""

CONVERSATION = [
    {"role": "user", "content": "Hello! What's 2+2?"},
    {"role": "assistant", "content": "  It's 4.  "},
    {"role": "user", "content": "And in French, café-style? 你好"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + CONVERSATION
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle — current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "tool", "content": '{"wind": "calm"}'},
]

LLAMA3_SPECIAL = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
MISTRAL_SPECIAL = dict(bos_token="<s>", eos_token="</s>")
CHATML_SPECIAL = dict(eos_token="<|im_end|>")


def render_both(template: str, special: dict[str, str], messages: list[dict[str, Any]],
                **kwargs: Any) -> tuple[str, str]:
    reference = build_hf_tokenizer(chat_template=template, **special)
    expected = reference.apply_chat_template(messages, tokenize=False, **kwargs)
    actual = ChatTemplate(template, SpecialTokens(**special)).render(messages, **kwargs)
    return actual, expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["no_system", "system"])
def test_chatml_matches_transformers_including_default_system_prompt(messages, add_generation_prompt):
    actual, expected = render_both(CHATML_TEMPLATE, CHATML_SPECIAL, messages,
                                   add_generation_prompt=add_generation_prompt)
    assert actual == expected
    assert ("named SmolLM" in actual) == (messages is CONVERSATION)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_matches_transformers_with_bos_and_eot(add_generation_prompt):
    actual, expected = render_both(LLAMA3_TEMPLATE, LLAMA3_SPECIAL, WITH_SYSTEM,
                                   add_generation_prompt=add_generation_prompt)
    assert actual == expected
    assert actual.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>")
    assert actual.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == add_generation_prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_qwen25_matches_transformers_with_and_without_tools(with_tools, add_generation_prompt):
    tools = [WEATHER_TOOL] if with_tools else None
    actual, expected = render_both(QWEN25_TEMPLATE, CHATML_SPECIAL, TOOL_CONVERSATION, tools=tools,
                                   add_generation_prompt=add_generation_prompt)
    assert actual == expected
    assert ('"description": "Météo actuelle — current weather"' in actual) == with_tools  # ensure_ascii=False
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in actual


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_extra_kwargs_namespace_generation_tag_and_indented_tojson_match_transformers(enable_thinking):
    actual, expected = render_both(FEATURES_TEMPLATE, CHATML_SPECIAL, CONVERSATION, tools=[WEATHER_TOOL],
                                   add_generation_prompt=True, enable_thinking=enable_thinking)
    assert actual == expected
    assert "messages: 3" in actual
    assert ("<think>" in actual) == (not enable_thinking)
    assert '[\n  {\n    "type": "function",' in actual


def test_mistral_matches_transformers_with_bos_and_eos():
    actual, expected = render_both(MISTRAL_TEMPLATE, MISTRAL_SPECIAL, CONVERSATION, add_generation_prompt=True)
    assert actual == expected
    assert actual.startswith("<s>[INST] Hello!") and "It's 4.  </s>[INST]" in actual


def test_raise_exception_in_template_becomes_value_error_with_its_message():
    wrong_order = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match=r"^Conversation roles must alternate user/assistant"):
        ChatTemplate(MISTRAL_TEMPLATE, SpecialTokens(**MISTRAL_SPECIAL)).render(wrong_order)
    with pytest.raises(Exception, match="Conversation roles must alternate"):  # the reference agrees
        build_hf_tokenizer(chat_template=MISTRAL_TEMPLATE, **MISTRAL_SPECIAL).apply_chat_template(
            wrong_order, tokenize=False)


def test_text_content_parts_are_joined_with_newlines():
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    template = ChatTemplate(CHATML_TEMPLATE, SpecialTokens(**CHATML_SPECIAL))
    assert template.render(parts) == template.render([{"role": "user", "content": "first\nsecond"}])


def test_non_text_content_part_is_rejected():
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match="'image_url'.*not supported by this model"):
        normalize_messages(image)


def test_normalize_messages_copies_and_aliases_reasoning():
    original = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    normalized = normalize_messages(original)
    normalized[0]["content"] = "changed"
    assert original[0]["content"] == "4"
    assert normalized[0]["reasoning_content"] == normalized[0]["thinking"] == "2+2"


def test_strftime_now_renders_current_date():
    template = ChatTemplate("{{ strftime_now('%Y') }}", SpecialTokens())
    assert template.render([]) == str(datetime.now().year)


def test_unset_special_tokens_render_empty_not_none():
    assert ChatTemplate("[{{ bos_token }}]", SpecialTokens()).render([]) == "[]"


def test_syntax_error_is_value_error_naming_the_line():
    with pytest.raises(ValueError, match=r"chat template is invalid \(line 2"):
        ChatTemplate("ok\n{% for m in messages %}", SpecialTokens())


def test_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", SpecialTokens())
    with pytest.raises(ValueError, match="chat template failed to render"):
        template.render([{"role": "user", "content": "x"}])
