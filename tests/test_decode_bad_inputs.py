"""pd-decode refuses bad requests with the right status and an OpenAI error object, and stays healthy.

One server with an API key and a 64 KiB body limit serves the whole module; every case is
a raw httpx request so nothing in a client library fixes the input up first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest

from server_utils import MODEL, parse_metrics, start_decode_server

API_KEY = "sk-test"
MAX_BODY = 65536
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]
LONG_CONTENT = "hello " * 1100  # > 1024 tokens, < 64 KiB


@pytest.fixture(scope="module")
def server():
    proc = start_decode_server("--api-key", API_KEY, "--max-request-bytes", str(MAX_BODY))
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def _chunked_body(num_bytes: int):
    for _ in range(num_bytes // 4096 + 1):
        yield b" " * 4096


@dataclass
class Case:
    id: str
    status: int
    json: Any = None
    content: bytes | Callable[[], Any] | None = None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    param: str | None = None          # expected error.param, when the case names one
    message_has: tuple[str, ...] = ()


CASES = [
    Case("malformed-json", 400, content=b'{"model": ', headers={**AUTH, "content-type": "application/json"}),
    Case("body-not-object", 400, json=[1, 2, 3]),
    Case("body-not-json-content-type", 400, content=json.dumps(chat()).encode(),
         headers={**AUTH, "content-type": "text/plain"}),
    Case("messages-as-string", 400, json=chat(messages="hi"), param="messages"),
    Case("max-tokens-string", 400, json=chat(max_tokens="ten"), param="max_tokens"),
    Case("temperature-string", 400, json=chat(temperature="hot"), param="temperature"),
    Case("negative-max-tokens", 400, json=chat(max_tokens=-1), param="max_tokens"),
    Case("zero-max-tokens", 400, json=chat(max_tokens=0), param="max_tokens"),
    Case("empty-messages", 400, json=chat(messages=[]), param="messages"),
    Case("unknown-role", 400, json=chat(messages=[{"role": "wizard", "content": "x"}]), param="messages[0].role"),
    Case("user-message-without-content", 400, json=chat(messages=[{"role": "user"}]), param="messages[0]"),
    Case("missing-model", 400, json={"messages": HI}, param="model"),
    Case("prompt-longer-than-context", 400, json=chat(messages=[{"role": "user", "content": LONG_CONTENT}]),
         param="messages", message_has=("1024",)),
    Case("temperature-5", 400, json=chat(temperature=5), param="temperature"),
    Case("top-p-0", 400, json=chat(top_p=0), param="top_p"),
    Case("n-0", 400, json=chat(n=0), param="n"),
    Case("top-logprobs-without-logprobs", 400, json=chat(top_logprobs=2), param="top_logprobs"),
    Case("stream-options-without-stream", 400, json=chat(stream_options={"include_usage": True}),
         param="stream_options"),
    Case("stop-20-strings", 400, json=chat(stop=[f"s{i}" for i in range(20)]), param="stop"),
    Case("session-id-bad-chars", 400, json=chat(session_id="bad id!"), param="session_id"),
    Case("tools-unsupported", 400, json=chat(tools=[{"type": "function"}]), param="tools"),
    Case("embeddings-bad-encoding-format", 400, path="/v1/embeddings",
         json={"model": MODEL, "input": "x", "encoding_format": "hex"}, param="encoding_format"),
    Case("embeddings-empty-input", 400, path="/v1/embeddings", json={"model": MODEL, "input": ""}, param="input"),
    Case("embeddings-empty-list", 400, path="/v1/embeddings", json={"model": MODEL, "input": []}, param="input"),
    Case("completions-empty-prompt", 400, path="/v1/completions", json={"model": MODEL, "prompt": ""},
         param="prompt"),
    Case("completions-token-out-of-vocab", 400, path="/v1/completions",
         json={"model": MODEL, "prompt": [1, 10_000_000], "max_tokens": 2}, param="prompt"),
    Case("completions-negative-token", 400, path="/v1/completions",
         json={"model": MODEL, "prompt": [1, -3], "max_tokens": 2}, param="prompt"),
    Case("completions-echo-with-logprobs", 400, path="/v1/completions",
         json={"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 2}),
    Case("detokenize-out-of-vocab", 400, path="/detokenize", json={"tokens": [10_000_000]}, param="tokens"),
    Case("tokenize-prompt-and-messages", 400, path="/tokenize", json={"prompt": "x", "messages": HI}),
    Case("unknown-model", 404, json=chat(model="gpt-9"), param="model"),
    Case("missing-key", 401, json=chat(), headers={}),
    Case("wrong-key", 401, json=chat(), headers={"Authorization": "Bearer sk-wrong"}),
    Case("wrong-scheme", 401, json=chat(), headers={"Authorization": f"Basic {API_KEY}"}),
    Case("unknown-route", 404, path="/v1/nope", method="GET"),
    Case("wrong-method", 405, path="/v1/chat/completions", method="GET"),
    Case("body-over-limit", 413, content=b"x" * (MAX_BODY + 1), headers={**AUTH, "content-type": "application/json"},
         message_has=(str(MAX_BODY),)),
    Case("chunked-body-over-limit", 413, content=lambda: _chunked_body(MAX_BODY + 1),
         headers={**AUTH, "content-type": "application/json"}, message_has=(str(MAX_BODY),)),
    Case("usage-session-id-too-long", 400, path="/v1/usage?session_id=" + "x" * 300, method="GET"),
]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip()
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], (str, int))
    return err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_status_and_openai_error(http, case: Case):
    content = case.content() if callable(case.content) else case.content
    r = http.request(case.method, case.path, json=case.json, content=content, headers=case.headers)
    err = assert_openai_error(r, case.status)
    if case.param is not None:
        assert err["param"] == case.param
    for text in case.message_has:
        assert text in err["message"]
    if case.status == 401:
        assert err["type"] == "authentication_error"


def test_oversize_prompt_message_names_its_length_and_the_limit(http):
    messages = [{"role": "user", "content": LONG_CONTENT}]
    n = http.post("/tokenize", json={"messages": messages}, headers=AUTH).json()["count"]
    assert n > 1024
    err = assert_openai_error(http.post("/v1/chat/completions", json=chat(messages=messages), headers=AUTH), 400)
    assert str(n) in err["message"] and "1024" in err["message"]


def test_largest_seed_with_two_choices_is_answered(http):
    r = http.post("/v1/chat/completions", json=chat(seed=2**64 - 1, n=2, temperature=1.0), headers=AUTH)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_server_is_healthy_after_bad_requests(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json=chat(messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    m = parse_metrics(http.get("/metrics").text)
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
    assert m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"]


def test_rejected_requests_are_counted_by_status(http):
    for body in (chat(max_tokens=0), chat(model="gpt-9")):
        http.post("/v1/chat/completions", json=body, headers=AUTH)
    m = parse_metrics(http.get("/metrics").text)
    counted = {k for k, v in m.items() if k.startswith("pdserve:request_errors_total{") and v > 0}
    assert any('status="400"' in k for k in counted), counted
    assert any('status="404"' in k for k in counted), counted
