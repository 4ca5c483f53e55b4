"""pd-decode end to end: a real server process driven by the official OpenAI client.

One server serves the whole module; the SIGTERM drain test starts its own at the end.
Generation is greedy and short so the module stays fast on two CPU cores.
"""
from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import pytest
from openai import OpenAI

from server_utils import MODEL, parse_metrics, start_decode_server

GREEDY = {"temperature": 0.0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    proc = start_decode_server()
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.logs()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def metrics_of(http: httpx.Client) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    return parse_metrics(r.text)


# ---- chat ----

def test_chat_returns_an_assistant_message_with_usage(client):
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, **GREEDY)
    choice = resp.choices[0]
    assert resp.model == MODEL and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_assembles_to_the_non_streamed_greedy_answer(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=20,
                  **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage_ends_with_a_usage_only_chunk(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=10, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_give_top_alternatives_with_the_greedy_token_first(client):
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == resp.choices[0].message.content


def test_stop_string_ends_the_answer_before_it(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count from one to ten in words."}],
                  max_tokens=24, **GREEDY)
    base = client.chat.completions.create(**kwargs).choices[0].message.content
    words = base.split()
    assert len(words) >= 4, base
    stop = words[2]
    resp = client.chat.completions.create(stop=[stop], **kwargs)
    choice = resp.choices[0]
    assert choice.message.content == base[:base.index(stop)]
    assert stop not in choice.message.content
    assert choice.finish_reason == "stop"
    assert choice.model_extra.get("stop_reason") == stop


def test_same_seed_reproduces_a_sampled_answer(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Invent a name for a cat."}],
                  max_tokens=8, temperature=1.0)
    first = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    again = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2)}
    assert again == first
    assert len(others | {first}) > 1, "different seeds never changed the sample"


# ---- legacy completions ----

def test_completion_of_a_string_prompt(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, **GREEDY)
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= 8


def test_completion_of_token_ids_equals_the_string_prompt(client, http):
    prompt = "The capital of France is"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens


def test_completion_n2_returns_two_indexed_choices(client):
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, n=2, **GREEDY)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.choices[0].text == resp.choices[1].text  # greedy: both choices agree
    assert resp.usage.completion_tokens == 2 * 6 or resp.choices[0].finish_reason == "stop"


def test_completion_echo_prefixes_the_prompt(client):
    prompt = "Roses are red,"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + plain


# ---- embeddings ----

def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embeddings_base64_decodes_to_the_float_vector(client):
    text = "pdserve embeds text"
    floats = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    b64 = client.embeddings.create(model=MODEL, input=text, encoding_format="base64").data[0].embedding
    assert isinstance(b64, str)
    raw = base64.b64decode(b64)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(floats) > 0
    assert decoded == pytest.approx(floats, abs=1e-7)


def test_embeddings_mean_and_last_are_unit_vectors_that_differ(client, http):
    text = "a short sentence to embed"
    mean = client.embeddings.create(model=MODEL, input=text, encoding_format="float",
                                    extra_body={"embedding_type": "mean"})
    last = client.embeddings.create(model=MODEL, input=text, encoding_format="float",
                                    extra_body={"embedding_type": "last"})
    vm, vl = mean.data[0].embedding, last.data[0].embedding
    assert _norm(vm) == pytest.approx(1.0, abs=1e-4)
    assert _norm(vl) == pytest.approx(1.0, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(vm, vl)) > 1e-3
    n = http.post("/tokenize", json={"prompt": text}).json()["count"]
    assert mean.usage.prompt_tokens == n == mean.usage.total_tokens


def test_embeddings_of_a_batch_count_every_input(client):
    resp = client.embeddings.create(model=MODEL, input=["one", "two words"], encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1]
    single = sum(client.embeddings.create(model=MODEL, input=t, encoding_format="float").usage.prompt_tokens
                 for t in ("one", "two words"))
    assert resp.usage.prompt_tokens == single


# ---- models, tokenize, health, metrics ----

def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra.get("max_model_len") == 1024


def test_tokenize_detokenize_round_trip(http):
    text = "Hello world, this is pdserve speaking."
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert tok.status_code == 200
    body = tok.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 1024
    detok = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert detok.status_code == 200
    assert detok.json()["prompt"] == text


def test_tokenize_messages_matches_the_chat_prompt_length(client, http):
    n = http.post("/tokenize", json={"messages": QUESTION}).json()["count"]
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, **GREEDY)
    assert resp.usage.prompt_tokens == n


def test_health_is_ok(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_metrics_expose_the_vllm_names(client, http):
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, **GREEDY)
    text = http.get("/metrics").text
    for name in ("vllm:time_to_first_token_seconds", "vllm:prompt_tokens_total", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total"):
        assert name in text, name
    m = parse_metrics(text)
    assert m["vllm:prompt_tokens_total"] > 0
    assert m["vllm:time_to_first_token_seconds_count"] > 0
    assert m["vllm:num_requests_running"] == 0
    assert 0.0 <= m["vllm:kv_cache_usage_perc"] <= 1.0


def test_repeated_long_prompt_reports_cached_tokens(client, http):
    long_text = " ".join(f"Item {i} is a unique marker for the prefix cache test." for i in range(30))
    messages = [{"role": "user", "content": long_text + " Summarize."}]
    hits_before = metrics_of(http)["vllm:prefix_cache_hits_total"]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **GREEDY)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **GREEDY)
    n = first.usage.prompt_tokens
    assert n > 200
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens_details.cached_tokens
    assert n - 16 <= cached < n  # every full block of the prompt, never the whole prompt
    assert metrics_of(http)["vllm:prefix_cache_hits_total"] - hits_before >= cached


# ---- shutdown (own server, runs last) ----

def test_sigterm_drains_an_in_flight_stream_and_exits_zero():
    proc = start_decode_server()
    try:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 32, "ignore_eos": True, "stream": True,
                **GREEDY}
        contents, finish = [], None
        with httpx.Client(timeout=60) as c, c.stream("POST", proc.url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            signalled = False
            for line in lines:
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                choice = json.loads(data)["choices"][0]
                if choice["delta"].get("content"):
                    contents.append(choice["delta"]["content"])
                    if not signalled:
                        proc.signal()  # SIGTERM while the stream is mid-flight
                        signalled = True
                finish = choice["finish_reason"] or finish
            else:
                pytest.fail("the stream ended without [DONE]")
        assert signalled and finish == "length"
        assert len(contents) > 1
        assert proc.wait(30) == 0, proc.logs()
    finally:
        proc.stop()
