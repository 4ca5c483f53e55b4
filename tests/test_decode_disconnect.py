"""Clients that go away mid-request leave no KV blocks behind on pd-decode.

One server (no sessions used, so every block must come back to the free list; prefix-cached
blocks count as free) takes a storm of streaming clients that hang up at random points,
then a non-streaming client that times out during a long generation.
"""
from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_utils import MODEL, parse_metrics, start_decode_server

NUM_CLIENTS = 50
CONCURRENCY = 16
MAX_TOKENS = 64
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    proc = start_decode_server()
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def metrics(http: httpx.Client) -> dict[str, float]:
    return parse_metrics(http.get("/metrics").text)


def wait_until_idle(http: httpx.Client, timeout: float = 30.0) -> dict[str, float]:
    """Polls /metrics until nothing runs or waits; returns that snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"requests still active after {timeout:.0f} s: running={m['vllm:num_requests_running']} "
                        f"waiting={m['vllm:num_requests_waiting']}")
        time.sleep(0.05)


def assert_all_blocks_free(m: dict[str, float]) -> None:
    assert m["pdserve:sessions_resident"] == 0
    assert m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"], m


def greedy_answer(http: httpx.Client) -> str:
    r = http.post("/v1/chat/completions",
                  json={"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def baseline_answer(http) -> str:
    return greedy_answer(http)


async def _stream_then_hang_up(url: str, index: int, num_chunks: int, sem: asyncio.Semaphore) -> int:
    """Opens a stream, reads `num_chunks` SSE events, closes the connection; returns events read."""
    body = {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Client {index}: tell me a long story about ships."}]}
    async with sem:
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", url + "/chat/completions", json=body) as r:
                assert r.status_code == 200
                read = 0
                if num_chunks == 0:
                    return 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        read += 1
                        if read >= num_chunks:
                            break
                return read


async def _storm(url: str) -> list[int]:
    rng = random.Random(1234)
    sem = asyncio.Semaphore(CONCURRENCY)
    # k=0 (hang up on the headers) and k past the end are always in; the rest mostly early.
    plan = [0, MAX_TOKENS + 4] + [min(int(rng.expovariate(1 / 12)), MAX_TOKENS + 4) for _ in range(NUM_CLIENTS - 2)]
    return await asyncio.gather(*(_stream_then_hang_up(url, i, k, sem) for i, k in enumerate(plan)))


def num_finished(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("vllm:request_success_total{"))


def test_streams_dropped_at_random_points_free_every_block(server, http, baseline_answer):
    finished_before = num_finished(metrics(http))
    read = asyncio.run(_storm(server.url))
    assert 0 in read and max(read) > MAX_TOKENS // 2  # hang-ups from the very start to late
    m = wait_until_idle(http)
    assert num_finished(m) - finished_before < NUM_CLIENTS  # most were aborted, not finished
    assert_all_blocks_free(m)
    assert greedy_answer(http) == baseline_answer


def test_non_streaming_client_timeout_aborts_the_generation(server, http):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    finished_before = num_finished(metrics(http))
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(httpx.post, server.url + "/chat/completions", json=body, timeout=0.5)
        seen_running = False
        while not call.done():
            seen_running = seen_running or metrics(http)["vllm:num_requests_running"] == 1
            time.sleep(0.02)
        with pytest.raises(httpx.TimeoutException):
            call.result()
    gave_up = time.monotonic()
    assert seen_running
    m = wait_until_idle(http, timeout=5.0)
    # 900 tokens take far longer than this on CPU: the engine stopped because the client left.
    assert time.monotonic() - gave_up < 5.0
    assert num_finished(m) == finished_before
    assert_all_blocks_free(m)


def test_server_answers_normally_after_the_disconnects(http, baseline_answer):
    assert http.get("/health").status_code == 200
    assert greedy_answer(http) == baseline_answer
    assert_all_blocks_free(wait_until_idle(http))
