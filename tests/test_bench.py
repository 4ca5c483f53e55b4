"""pd-bench: SSE parsing, report math, workload generation, multi-turn messages, and a full run.

The full runs use a tiny FastAPI server written here that streams canned OpenAI-shaped
responses: pd-bench is a client of arbitrary OpenAI-compatible servers, so this stands in for
"any server", not for pdserve.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pd.bench.__main__ import main
from pd.bench.client import RequestFailed, RequestRecord, iter_sse_data, read_stream
from pd.bench.report import percentile, summarize
from pd.bench.workload import (WorkloadConfig, make_sessions, poisson_gaps, single_turn_requests,
                               to_prompt)


async def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _events(data: bytes, size: int) -> list[str]:
    async def collect():
        return [e async for e in iter_sse_data(_chunks(data, size))]
    return asyncio.run(collect())


def _record_from(data: bytes, size: int = 7) -> RequestRecord:
    record = RequestRecord(index=0)
    ticks = iter(range(1, 100))
    asyncio.run(read_stream(_chunks(data, size), record, clock=lambda: float(next(ticks))))
    return record


def _sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n"
                    for p in payloads)


def _delta(content: str | None, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


# ---- SSE parsing -----------------------------------------------------------------------------------
SSE_BYTES = ("event: message\r\ndata: {\"a\": 1}\r\n\r\n"
             ": keep-alive comment\n\n"
             "data: first line\ndata:second line\n\n"
             "data: caf\u00e9 \u2713\r\r"
             "id: 7\ndata: [DONE]\n\n").encode()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, len(SSE_BYTES)])
def test_sse_events_are_the_same_for_any_split_of_the_byte_stream(size):
    assert _events(SSE_BYTES, size) == ['{"a": 1}', "first line\nsecond line", "caf\u00e9 \u2713", "[DONE]"]


def test_sse_event_without_a_closing_blank_line_is_still_delivered():
    assert _events(b"data: 1\n\ndata: [DONE]", 4) == ["1", "[DONE]"]


def test_stream_records_one_time_per_content_chunk_and_takes_tokens_from_usage():
    body = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                _delta("Hel"), _delta("lo"), _delta(" there", "length"),
                {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15,
                                          "prompt_tokens_details": {"cached_tokens": 8}}},
                b"[DONE]")
    record = _record_from(body)
    assert record.chunk_times == [2.0, 3.0, 4.0]  # the role-only chunk is not a token
    assert record.text == "Hello there"
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (11, 4, 8)
    assert record.num_output_tokens == 4
    assert record.finish_reason == "length" and record.is_done


def test_without_usage_output_tokens_are_counted_as_chunks():
    body = _sse({"choices": [{"index": 0, "text": "a"}]}, {"choices": [{"index": 0, "text": "b"}]}, b"[DONE]")
    record = _record_from(body)
    record.expected_prompt_tokens = 42
    assert record.completion_tokens is None and record.num_output_tokens == 2
    assert record.num_prompt_tokens == 42 and record.cached_tokens is None


def test_error_event_in_the_stream_fails_the_request_with_its_message():
    body = _sse(_delta("x"), {"error": {"message": "KV cache exhausted", "code": 500}})
    with pytest.raises(RequestFailed, match="KV cache exhausted"):
        _record_from(body)


# ---- report math -----------------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([5.0], 99) == 5.0


def _timed_record(send: float, chunks: list[float], end: float, out: int, prompt: int, **kw) -> RequestRecord:
    return RequestRecord(index=0, send_time=send, chunk_times=chunks, end_time=end, completion_tokens=out,
                         prompt_tokens=prompt, is_done=True, **kw)


def test_summary_figures_on_known_records():
    records = [_timed_record(0.0, [0.1, 0.2, 0.4], 0.4, out=3, prompt=10),
               _timed_record(1.0, [1.3, 1.4], 1.5, out=2, prompt=20),
               RequestRecord(index=2, error="HTTP 500: overloaded")]
    s = summarize(records, duration_s=2.0)
    assert (s["successful"], s["failed"]) == (2, 1)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(17.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)  # 100 and 300
    assert s["tpot_ms"]["mean"] == pytest.approx(175.0)  # (400-100)/2 and (500-300)/1
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)  # gaps 100, 200, 100
    assert s["e2e_ms"]["p99"] == pytest.approx(400 + 0.99 * 100)
    assert s["errors"] == [{"message": "HTTP 500: overloaded", "count": 1}]


def test_summary_splits_ttft_and_cached_tokens_by_turn():
    records = [_timed_record(0.0, [0.5], 0.6, out=1, prompt=100, turn=1, cached_tokens=0),
               _timed_record(1.0, [1.1], 1.2, out=1, prompt=200, turn=2, cached_tokens=96),
               _timed_record(2.0, [2.3], 2.4, out=1, prompt=300, turn=3, cached_tokens=192)]
    s = summarize(records, duration_s=3.0)
    assert s["ttft_first_turn_ms"]["mean"] == pytest.approx(500.0)
    assert s["ttft_later_turns_ms"]["mean"] == pytest.approx(200.0)
    assert [s["by_turn"][t]["mean_cached_tokens"] for t in ("1", "2", "3")] == [0, 96, 192]


# ---- workload --------------------------------------------------------------------------------------
def test_lengths_are_uniform_within_the_range_ratio():
    config = WorkloadConfig(num_requests=400, input_len=100, output_len=40, range_ratio=0.5, seed=1)
    requests = single_turn_requests(config, tokens_per_word=1.0, count=config.num_requests)
    words = [len(r.messages[-1]["content"].split()) for r in requests]
    outs = [r.max_tokens for r in requests]
    assert min(words) >= 50 and max(words) <= 150 and min(outs) >= 20 and max(outs) <= 60
    assert min(words) < 60 and max(words) > 140  # the whole range is used
    assert sum(words) / len(words) == pytest.approx(100, abs=5)


def test_prompt_words_follow_the_tokens_per_word_ratio():
    config = WorkloadConfig(dataset="fixed", input_len=130, range_ratio=0.5, seed=0)
    requests = single_turn_requests(config, tokens_per_word=1.3, count=5)
    assert {len(r.messages[-1]["content"].split()) for r in requests} == {100}
    assert {r.max_tokens for r in requests} == {128}
    assert {r.expected_prompt_tokens for r in requests} == {130}


def test_workload_is_determined_by_the_seed():
    def prompts(seed: int) -> list[str]:
        config = WorkloadConfig(num_requests=8, input_len=50, range_ratio=0.3, seed=seed)
        return [r.messages[-1]["content"] for r in single_turn_requests(config, 1.3, count=8)]
    assert prompts(3) == prompts(3)
    assert prompts(3) != prompts(4)


def test_prompts_start_differently_unless_a_prefix_is_shared():
    config = WorkloadConfig(num_requests=300, input_len=20, seed=0)
    requests = single_turn_requests(config, 1.0, count=300)
    assert len({r.messages[0]["content"].split()[0] for r in requests[:200]}) == 200
    assert len({r.messages[0]["content"] for r in requests}) == 300

    shared = single_turn_requests(WorkloadConfig(input_len=20, shared_prefix_len=64, seed=0), 1.0, count=4)
    assert len({r.messages[0]["content"] for r in shared}) == 1
    assert shared[0].messages[0]["role"] == "system" and len(shared[0].messages[0]["content"].split()) == 64
    assert len({r.messages[1]["content"] for r in shared}) == 4


def test_poisson_gaps_average_one_over_the_rate():
    gaps = poisson_gaps(4.0, 2000, seed=0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert poisson_gaps(float("inf"), 3, seed=0) == [0.0, 0.0, 0.0]


def _session(send_history: bool, shared_prefix_len: int = 8):
    config = WorkloadConfig(dataset="multiturn", num_sessions=2, turns=3, input_len=10,
                            shared_prefix_len=shared_prefix_len, send_history=send_history, seed=0)
    return make_sessions(config, 1.0)[1]


def test_send_history_yes_sends_the_whole_conversation_each_turn():
    session = _session(send_history=True)
    first = session.next_request()
    assert [m["role"] for m in first.messages] == ["system", "user"]
    session.record_reply("reply one")
    second = session.next_request()
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[1] == first.messages[1] and second.messages[2]["content"] == "reply one"
    assert (second.turn, second.session_id, second.index) == (2, session.session_id, 4)
    assert second.expected_prompt_tokens == sum(len(m["content"].split()) for m in second.messages)


def test_send_history_no_sends_only_the_new_user_message_with_the_session_id():
    session = _session(send_history=False)
    assert [m["role"] for m in session.next_request().messages] == ["system", "user"]
    session.record_reply("reply one")
    second = session.next_request()
    assert [m["role"] for m in second.messages] == ["user"]
    assert second.messages[0]["content"] == session.user_texts[1]
    assert second.session_id == session.session_id and second.turn == 2


def test_completions_prompt_is_plain_for_one_turn_and_a_transcript_for_several():
    system, user = {"role": "system", "content": "S"}, {"role": "user", "content": "U"}
    assert to_prompt((system, user)) == "S\n\nU"
    transcript = to_prompt((user, {"role": "assistant", "content": "A"}, user))
    assert transcript == "User: U\n\nAssistant: A\n\nUser: U\n\nAssistant:"


# ---- end to end against a tiny OpenAI-compatible server ----------------------------------------------
class FakeServer:
    """Streams `max_tokens` one-word chunks; counts a prompt token per word; fails every Nth request."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.fail_every = 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.post("/tokenize")
        async def tokenize(request: Request):
            words = (await request.json())["prompt"].split()
            return {"tokens": list(range(len(words))), "count": len(words)}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if self.fail_every and len(self.bodies) % self.fail_every == 0:
                return JSONResponse({"error": {"message": "overloaded, retry later"}}, status_code=503)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        self.app = app

    async def _stream(self, body: dict):
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        cached = sum(len(m["content"].split()) for m in body["messages"][:-1])
        yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.001)
            finish = "length" if i == body["max_tokens"] - 1 else None
            yield "data: " + json.dumps(_delta("word ", finish)) + "\n\n"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": cached}}
        yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fake
    server.should_exit = True
    thread.join(5)
    sock.close()


def test_bench_run_counts_tokens_and_failures_and_writes_json(fake_server, tmp_path, capsys):
    fake_server.bodies.clear()
    fake_server.fail_every = 4
    out = tmp_path / "result.json"
    code = main(["--base-url", fake_server.url + "/v1", "--num-requests", "12", "--concurrency", "3",
                 "--input-len", "40", "--output-len", "5", "--warmup", "4", "--seed", "7", "--no-progress",
                 "--json", str(out), "--label", "smoke"])
    assert code == 0
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert (results["num_requests"], results["successful"], results["failed"]) == (12, 9, 3)
    assert results["errors"] == [{"message": "HTTP 503: overloaded, retry later", "count": 3}]
    assert results["total_output_tokens"] == 9 * 5
    assert results["mean_input_tokens"] == pytest.approx(40)  # calibrated by /tokenize: 1 token per word
    assert results["tpot_ms"]["count"] == 9 and results["itl_ms"]["count"] == 9 * 4
    assert doc["label"] == "smoke" and doc["config"]["model"] == "fake-model"
    assert doc["config"]["tokens_per_word_source"] == "tokenize" and doc["config"]["seed"] == 7
    body = fake_server.bodies[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["temperature"] == 0
    assert "TTFT" in capsys.readouterr().out


def test_multiturn_run_sends_session_ids_and_reports_turns(fake_server, tmp_path):
    fake_server.bodies.clear()
    fake_server.fail_every = 0
    out = tmp_path / "multiturn.json"
    code = main(["--base-url", fake_server.url, "--dataset", "multiturn", "--num-sessions", "3", "--turns", "2",
                 "--input-len", "10", "--output-len", "3", "--send-history", "yes", "--seed", "1",
                 "--no-progress", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert results["successful"] == 6
    assert {b["session_id"] for b in fake_server.bodies} == {"bench-1-0", "bench-1-1", "bench-1-2"}
    assert results["by_turn"]["1"]["mean_cached_tokens"] == 0
    assert results["by_turn"]["2"]["mean_cached_tokens"] == pytest.approx(10 + 3)  # user turn 1 + reply
    assert results["ttft_first_turn_ms"]["count"] == 3 and results["ttft_later_turns_ms"]["count"] == 3


def test_unreachable_server_and_bad_arguments_exit_with_2():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["--base-url", f"http://127.0.0.1:{port}", "--no-progress"]) == 2
    assert main(["--random-range-ratio", "1.5"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--endpoint", "embeddings"])
    assert exc.value.code == 2
