"""Sessions on pd-decode: server-kept history, resident KV between turns, per-key isolation.

One server with two API keys serves the module. Key A holds a two-turn conversation in
session "s1"; key B reuses the same session id and must not see A's history.
"""
from __future__ import annotations

import httpx
import pytest
from openai import NotFoundError, OpenAI

from server_utils import MODEL, parse_metrics, start_decode_server

KEY_A, KEY_B = "sk-alice", "sk-bob"
BLOCK_SIZE = 16
TURN_1 = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TURN_2 = [{"role": "user", "content": "And what is the capital of Germany?"}]


@pytest.fixture(scope="module")
def server():
    proc = start_decode_server("--api-key", KEY_A, "--api-key", KEY_B)
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def alice(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key=KEY_A, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def bob(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key=KEY_B, max_retries=0, timeout=60)


def ask(client: OpenAI, messages: list[dict], session_id: str | None = None, **kwargs):
    extra = {"session_id": session_id} if session_id else None
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                          extra_body=extra, **kwargs)


def usage_of(server, key: str, session_id: str) -> httpx.Response:
    return httpx.get(server.url + "/usage", params={"session_id": session_id},
                     headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def two_turns(alice):
    """Key A's session s1: turn one sends TURN_1, turn two sends only TURN_2."""
    first = ask(alice, TURN_1, "s1")
    second = ask(alice, TURN_2, "s1")
    return first, second


def test_turn_two_reuses_the_whole_first_turn(two_turns):
    first, second = two_turns
    assert first.choices[0].finish_reason == "stop"
    assert second.usage.prompt_tokens > first.usage.total_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens


def test_turn_two_with_only_the_new_message_answers_as_the_full_history_does(alice, two_turns):
    first, second = two_turns
    history = TURN_1 + [{"role": "assistant", "content": first.choices[0].message.content}] + TURN_2
    stateless = ask(alice, history)
    assert second.usage.prompt_tokens == stateless.usage.prompt_tokens
    assert second.choices[0].message.content == stateless.choices[0].message.content


def test_usage_sums_both_turns(server, two_turns):
    first, second = two_turns
    r = usage_of(server, KEY_A, "s1")
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["session_id"] == "s1" and u["turns"] == 2
    assert u["prompt_tokens"] == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert u["completion_tokens"] == first.usage.completion_tokens + second.usage.completion_tokens
    assert u["total_tokens"] == first.usage.total_tokens + second.usage.total_tokens
    assert u["cached_tokens"] == (first.usage.prompt_tokens_details.cached_tokens
                                  + second.usage.prompt_tokens_details.cached_tokens)
    assert u["resident"] is True
    assert u["resident_tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens
    assert u["max_model_len"] == 1024


def test_usage_reports_kv_capacity(server, two_turns):
    u = usage_of(server, KEY_A, "s1").json()
    m = parse_metrics(httpx.get(server.base_url + "/metrics", timeout=30).text)
    assert u["kv_tokens_total"] == m["pdserve:kv_blocks_total"] * BLOCK_SIZE
    assert u["resident_tokens"] <= u["kv_tokens_used"] <= u["kv_tokens_total"]
    assert m["pdserve:sessions_resident"] >= 1


def test_resending_the_full_history_is_not_duplicated(alice):
    first = ask(alice, TURN_1, "s-full")
    history = TURN_1 + [{"role": "assistant", "content": first.choices[0].message.content}] + TURN_2
    resent = ask(alice, history, "s-full")
    stateless = ask(alice, history)
    assert resent.usage.prompt_tokens == stateless.usage.prompt_tokens
    assert resent.usage.prompt_tokens_details.cached_tokens >= first.usage.total_tokens


def test_streamed_turn_is_kept_for_the_next_turn(server, alice):
    chunks = list(ask(alice, TURN_1, "s-stream", stream=True, stream_options={"include_usage": True}))
    first_usage = chunks[-1].usage
    second = ask(alice, TURN_2, "s-stream")
    assert second.usage.prompt_tokens_details.cached_tokens >= first_usage.total_tokens
    assert usage_of(server, KEY_A, "s-stream").json()["turns"] == 2


def test_sessions_are_isolated_per_api_key(server, alice, bob, two_turns):
    first, second = two_turns
    alone = ask(alice, TURN_2)  # the new message without any history
    theirs = ask(bob, TURN_2, "s1")
    assert theirs.usage.prompt_tokens == alone.usage.prompt_tokens < second.usage.prompt_tokens
    assert theirs.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert theirs.choices[0].message.content == alone.choices[0].message.content
    bob_usage = usage_of(server, KEY_B, "s1").json()
    assert bob_usage["turns"] == 1
    assert bob_usage["prompt_tokens"] == theirs.usage.prompt_tokens
    assert usage_of(server, KEY_A, "s1").json()["turns"] == 2


def test_session_of_another_key_is_not_found(server, alice):
    ask(alice, TURN_1, "alice-only")
    r = usage_of(server, KEY_B, "alice-only")
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "session_id"


def test_unknown_session_is_404_in_openai_shape(server, alice):
    r = usage_of(server, KEY_A, "never-used")
    assert r.status_code == 404
    err = r.json()["error"]
    assert "never-used" in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == "session_id" and "code" in err
    with pytest.raises(NotFoundError):
        alice.get("/usage", cast_to=object, options={"params": {"session_id": "never-used"}})
