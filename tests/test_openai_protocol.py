"""Specs for the OpenAI protocol layer: request validation, response shapes, the error layer."""
from __future__ import annotations

import base64
import json
import struct

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pd.openai.errors import (BodySizeLimitMiddleware, OpenAIError, describe_validation_errors,
                              install_error_handlers, not_found_model, overloaded)
from pd.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                EmbeddingRequest, TokenizeRequest, random_id)
from pd.openai.responses import (ChatCompletionChunk, ChatCompletionChunkChoice,
                                 ChatCompletionResponse, ChatLogprobToken, CompletionResponse,
                                 DeltaMessage, EmbeddingResponse, ModelList, UsageInfo,
                                 encode_embedding, sse_event)

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def rejection(cls, body: dict) -> tuple[str, str | None]:
    """(message, param) of the 400 the body would get."""
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return describe_validation_errors(info.value.errors())


def chat_rejection(**fields) -> tuple[str, str | None]:
    return rejection(ChatCompletionRequest, {"model": "m", "messages": USER, **fields})


# ---- chat requests ----

def test_minimal_chat_request_gets_defaults():
    req = chat()
    assert (req.stream, req.n, req.temperature, req.stop, req.requested_max_tokens) == (False, 1, 1.0, [], None)


def test_chat_needs_at_least_one_message():
    assert rejection(ChatCompletionRequest, {"model": "m", "messages": []})[1] == "messages"


def test_chat_rejects_unknown_role():
    message, param = rejection(ChatCompletionRequest, {"model": "m", "messages": [{"role": "bot", "content": "x"}]})
    assert param == "messages[0].role" and "'developer'" in message


def test_chat_accepts_developer_role_as_system_for_the_template():
    req = chat(messages=[{"role": "developer", "content": "Be brief."}, *USER])
    assert req.template_messages()[0] == {"role": "system", "content": "Be brief."}


def test_chat_content_null_only_for_assistant_with_tool_calls():
    ok = chat(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert ok.messages[1].content is None
    assert chat_rejection(messages=[{"role": "user", "content": None}])[1] == "messages[0]"


def test_chat_text_parts_are_joined_for_the_template():
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.template_messages() == [{"role": "user", "content": "a\nb"}]


def test_chat_image_parts_parse_but_are_refused_at_template_time():
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    req = chat(messages=[{"role": "user", "content": parts}])
    assert req.has_image and req.messages[0].content[1].image_url.url == "data:x"
    with pytest.raises(OpenAIError) as info:
        req.template_messages()
    assert (info.value.status_code, info.value.param) == (400, "messages[0].content")


def test_chat_rejects_unknown_content_part_type():
    message, param = chat_rejection(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])
    assert param == "messages[0].content" and "part 0" in message


def test_chat_ignores_unknown_fields():
    assert not hasattr(chat(logit_bias={"1": 5}, best_of=3), "best_of")


def test_null_means_default():
    req = chat(temperature=None, n=None, stop=None, max_tokens=None)
    assert (req.temperature, req.n, req.stop, req.max_tokens) == (1.0, 1, [], None)


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_must_be_positive(value):
    assert chat_rejection(max_tokens=value)[1] == "max_tokens"


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=100, max_completion_tokens=7).to_sampling_params(50).max_tokens == 7


def test_default_max_tokens_applies_when_unset():
    assert chat().to_sampling_params(123).max_tokens == 123


@pytest.mark.parametrize("value", [-0.1, 2.1])
def test_temperature_out_of_range(value):
    assert chat_rejection(temperature=value)[1] == "temperature"


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
                                         ("frequency_penalty", 2.5), ("presence_penalty", -2.5),
                                         ("repetition_penalty", 0.0), ("min_tokens", -1)])
def test_sampling_fields_out_of_range(field, value):
    assert chat_rejection(**{field: value})[1] == field


def test_top_logprobs_without_logprobs_rejected():
    message, param = chat_rejection(top_logprobs=5)
    assert param == "top_logprobs" and "logprobs" in message


def test_top_logprobs_above_20_rejected():
    assert chat_rejection(logprobs=True, top_logprobs=21)[1] == "top_logprobs"


def test_stop_string_becomes_a_list():
    assert chat(stop="###").stop == ["###"]


def test_at_most_16_stop_strings():
    assert chat_rejection(stop=[str(i) for i in range(17)])[1] == "stop"


def test_stop_strings_must_be_non_empty():
    assert chat_rejection(stop=["a", ""])[1] == "stop[1]"


@pytest.mark.parametrize("value", ["has space", "x" * 257, "", "é"])
def test_session_id_pattern(value):
    assert chat_rejection(session_id=value)[1] == "session_id"


def test_session_id_accepts_allowed_characters():
    assert chat(session_id="user-1.conv_2:turn-3").session_id == "user-1.conv_2:turn-3"


@pytest.mark.parametrize("value", [0, 17])
def test_n_range(value):
    assert chat_rejection(n=value)[1] == "n"


def test_tools_rejected():
    message, param = chat_rejection(tools=[{"type": "function", "function": {"name": "f"}}])
    assert param == "tools" and "tools are not supported" in message


def test_empty_tools_and_tool_choice_none_accepted():
    assert chat(tools=[], tool_choice="none").tool_choice == "none"


def test_tool_choice_required_rejected():
    assert chat_rejection(tool_choice="required")[1] == "tool_choice"


def test_response_format_text_accepted():
    assert chat(response_format={"type": "text"}).response_format.type == "text"


def test_response_format_json_object_rejected():
    message, param = chat_rejection(response_format={"type": "json_object"})
    assert param == "response_format.type" and "not supported" in message


def test_stream_options_need_stream():
    assert chat_rejection(stream_options={"include_usage": True})[1] == "stream_options"
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage_in_stream


def test_min_tokens_cannot_exceed_max_tokens():
    message, _ = chat_rejection(min_tokens=10, max_completion_tokens=5)
    assert "min_tokens (10) must not exceed max_tokens (5)" in message


def test_chat_to_sampling_params_maps_every_field():
    params = chat(max_tokens=9, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, frequency_penalty=0.1,
                  presence_penalty=-0.2, repetition_penalty=1.1, seed=7, stop=["x", "y"],
                  stop_token_ids=[2, 3], ignore_eos=True, min_tokens=2, skip_special_tokens=False,
                  include_stop_str_in_output=True, logprobs=True, top_logprobs=3).to_sampling_params(100)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (9, 0.5, 0.9, 40, 0.05)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.1, -0.2, 1.1)
    assert (params.seed, params.stop, params.stop_token_ids) == (7, ("x", "y"), (2, 3))
    assert (params.ignore_eos, params.min_tokens, params.logprobs) == (True, 2, 3)
    assert (params.skip_special_tokens, params.include_stop_str_in_output) == (False, True)


@pytest.mark.parametrize("fields,expected", [({}, None), ({"logprobs": False}, None),
                                             ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 5}, 5)])
def test_chat_logprobs_mapping(fields, expected):
    assert chat(**fields).to_sampling_params(10).logprobs == expected


# ---- completions, embeddings, tokenize ----

@pytest.mark.parametrize("prompt,batch", [("hi", ["hi"]), (["a", "b"], ["a", "b"]),
                                          ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_completion_prompt_forms(prompt, batch):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == batch


@pytest.mark.parametrize("prompt", ["", [], [1, "a"], [[1], []], [-1], ["a", ""], [True], [1.5]])
def test_completion_rejects_bad_prompts(prompt):
    assert rejection(CompletionRequest, {"model": "m", "prompt": prompt})[1] == "prompt"


def test_completion_rejects_suffix():
    assert rejection(CompletionRequest, {"model": "m", "prompt": "x", "suffix": "y"})[1] == "suffix"


def test_completion_logprobs_range_and_mapping():
    assert rejection(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6})[1] == "logprobs"
    assert CompletionRequest(model="m", prompt="x", logprobs=2).to_sampling_params(16).logprobs == 2


def test_completion_echo_with_logprobs_rejected():
    message, _ = rejection(CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "logprobs": 1})
    assert "echo with logprobs" in message


def test_embedding_defaults_and_batch():
    req = EmbeddingRequest(model="m", input=["a", "b"])
    assert (req.encoding_format, req.embedding_type, req.inputs()) == ("float", "mean", ["a", "b"])


@pytest.mark.parametrize("field,value", [("encoding_format", "hex"), ("embedding_type", "max"), ("dimensions", 64)])
def test_embedding_rejects(field, value):
    assert rejection(EmbeddingRequest, {"model": "m", "input": "x", field: value})[1] == field


def test_embedding_input_must_be_non_empty():
    assert rejection(EmbeddingRequest, {"model": "m", "input": ["a", ""]})[1] == "input"


def test_tokenize_takes_exactly_one_of_prompt_and_messages():
    assert TokenizeRequest(prompt="x").add_special_tokens
    assert TokenizeRequest(messages=USER).add_generation_prompt
    rejection(TokenizeRequest, {"prompt": "x", "messages": USER})
    rejection(TokenizeRequest, {})


def test_detokenize_rejects_negative_ids():
    assert DetokenizeRequest(tokens=[1, 2]).tokens == [1, 2]
    assert rejection(DetokenizeRequest, {"tokens": [-1]})[1] == "tokens[0]"


# ---- responses ----

def test_response_ids_and_objects():
    usage = UsageInfo.of(3, 2, cached_tokens=1)
    chat_resp = ChatCompletionResponse(model="m", choices=[], usage=usage)
    cmpl_resp = CompletionResponse(model="m", choices=[], usage=usage)
    assert chat_resp.id.startswith("chatcmpl-") and chat_resp.object == "chat.completion"
    assert cmpl_resp.id.startswith("cmpl-") and cmpl_resp.object == "text_completion"
    assert usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                  "prompt_tokens_details": {"cached_tokens": 1}}
    assert random_id("x-") != random_id("x-")


def test_chunk_delta_leaves_out_unset_fields():
    chunk = ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[
        ChatCompletionChunkChoice(index=0, delta=DeltaMessage(content="Hi"))])
    event = sse_event(chunk)
    body = json.loads(event.removeprefix("data: "))
    assert event.endswith("\n\n") and body["object"] == "chat.completion.chunk"
    assert body["choices"][0]["delta"] == {"content": "Hi"}


def test_logprob_minus_infinity_is_clamped_for_json():
    assert json.loads(ChatLogprobToken(token="a", logprob=float("-inf")).model_dump_json())["logprob"] == -9999.0


def test_base64_embedding_is_little_endian_float32():
    encoded = encode_embedding([1.0, -2.5], "base64")
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (1.0, -2.5)
    resp = EmbeddingResponse(data=[{"index": 0, "embedding": encoded}], model="m",
                             usage={"prompt_tokens": 2, "total_tokens": 2})
    assert resp.object == "list" and resp.data[0].object == "embedding"


def test_model_list_shape():
    listing = ModelList(data=[{"id": "m", "max_model_len": 2048}]).model_dump()
    assert listing["object"] == "list"
    assert listing["data"][0] | {"created": 0} == {"id": "m", "object": "model", "created": 0,
                                                   "owned_by": "pdserve", "max_model_len": 2048}


# ---- the error layer in a real FastAPI app ----

MAX_BYTES = 2048


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BYTES)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> dict:
        return {"max_tokens": req.requested_max_tokens}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        raise not_found_model(name)

    @app.get("/busy")
    async def busy() -> dict:
        raise overloaded("queue is full", 503, retry_after_s=2)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_openai_error(response, status: int, type_: str) -> dict:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == type_
    return error


def test_valid_request_passes(client):
    assert client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 4}).json() == {"max_tokens": 4}


def test_malformed_json_is_400(client):
    response = client.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["message"].startswith("could not parse the request body as JSON")


def test_validation_error_is_400_with_param(client):
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "bot", "content": "x"}]})
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == "messages[0].role" and error["message"].startswith("messages[0].role: ")


def test_body_that_is_not_json_object_is_400(client):
    response = client.post("/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"})
    assert "application/json" in assert_openai_error(response, 400, "invalid_request_error")["message"]


def test_unknown_route_is_404(client):
    error = assert_openai_error(client.post("/v1/nope", json={}), 404, "invalid_request_error")
    assert error["message"] == "no route for POST /v1/nope"


def test_wrong_method_is_405_with_allow_header(client):
    response = client.get("/v1/chat/completions")
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "POST"


def test_unknown_model_is_404_with_code(client):
    error = assert_openai_error(client.get("/v1/models/llama"), 404, "invalid_request_error")
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_overloaded_is_503_with_retry_after(client):
    response = client.get("/busy")
    assert_openai_error(response, 503, "server_overloaded")
    assert response.headers["retry-after"] == "2"


def test_oversized_body_with_content_length_is_413(client):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * MAX_BYTES}]})
    error = assert_openai_error(client.post("/v1/chat/completions", content=body,
                                            headers={"content-type": "application/json"}), 413, "invalid_request_error")
    assert str(MAX_BYTES) in error["message"]


def test_oversized_chunked_body_is_413(client):
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(4):
            yield b"x" * 1024
        yield b'"}]}'
    response = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "invalid_request_error")


def test_oversized_chunked_body_is_413_without_fastapi():
    async def echo_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    client = TestClient(BodySizeLimitMiddleware(echo_app, max_bytes=10))
    assert client.post("/", content=iter([b"12345", b"67890"])).text == "ok"
    assert_openai_error(client.post("/", content=iter([b"12345", b"678901"])), 413, "invalid_request_error")


def test_unexpected_exception_is_500_without_details(client):
    error = assert_openai_error(client.get("/boom"), 500, "internal_error")
    assert "secret" not in error["message"]


def test_openapi_schema_builds():
    assert "/v1/chat/completions" in make_app().openapi()["paths"]
