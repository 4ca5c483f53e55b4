"""PD under faults, with real processes and real signals.

One prefill node (restarted on the same port when a test kills it) and decode nodes that
point at it: `decode` (--pd-failure recompute, shared-memory transport), `decode_fail`
(--pd-failure fail, gRPC transport, started by the last test) and `decode_closed` (points at
a port nobody listens on: it serves everything locally, which makes it the colocated
reference for the greedy answers). Short timeouts keep the module quick: first chunk 3 s,
whole transfer 10 s, connect 1 s, prefill-side leases 5 s.

Tests run in file order and share the processes: closed port (d), SIGKILL mid-transfer (a),
restart (c), SIGSTOP/SIGCONT (b), --pd-failure fail (e).
"""
from __future__ import annotations

import random
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx

import pytest

from server_utils import MODEL, free_port, metrics, start_process, sum_of, wait_for

ENGINE = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-gb", "0.3", "--log-level", "info"]
PD_TIMEOUTS = ["--pd-min-prompt-tokens", "16", "--pd-first-chunk-timeout", "3", "--pd-transfer-timeout", "10",
               "--pd-connect-timeout", "1"]

# ---- deterministic prompts ---------------------------------------------------------------

_SUBJECTS = ["The harbour master", "A retired pilot", "The school nurse", "Our landlord", "The museum guide",
             "A young violinist", "The fire chief", "My cousin", "The tailor", "A night watchman"]
_VERBS = ["inspected", "carried", "repainted", "weighed", "hid", "returned", "found", "wrapped", "fixed", "sold"]
_OBJECTS = ["the copper kettle", "a bag of flour", "the lighthouse lamp", "four blue chairs", "the garden gate",
            "a torn umbrella", "the ferry ticket", "an empty crate", "the church bell", "a stack of letters"]
_WHEN = ["on Tuesday", "before dawn", "after the parade", "in late autumn", "during the blackout", "at noon"]


def story(seed: int, num_sentences: int) -> str:
    r = random.Random(seed)
    return " ".join(f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_WHEN)}."
                    for _ in range(num_sentences))


def prompt(seed: int, num_sentences: int) -> list[dict]:
    return [{"role": "user", "content": story(seed, num_sentences) + "\nWho found something, and when?"}]


LONG = [prompt(1, 135), prompt(2, 110), prompt(3, 85)]  # ~1,500 / ~1,200 / ~950 tokens
HANG = [prompt(4, 50), prompt(5, 45)]                     # ~550 tokens each
AFTER_RESTART = [prompt(6, 20), prompt(7, 20)]            # ~300 tokens each
AFTER_RESUME = prompt(8, 20)
FAIL = prompt(9, 80)                                      # ~900 tokens
MAX_TOKENS = 16


# ---- processes and helpers ------------------------------------------------------------------------

def log_text(proc) -> str:
    """The process's whole output (RunningProcess.logs() keeps only the tail)."""
    with proc._lock:
        return "".join(proc._stdout) + "".join(proc._stderr)


def blocks_all_free(base_url: str) -> bool:
    m = metrics(base_url)
    return m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"] and m["vllm:num_requests_running"] == 0


def chat(base_url: str, messages: list[dict], timeout: float = 300) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0})


def answer(base_url: str, messages: list[dict]) -> tuple[str, int]:
    r = chat(base_url, messages)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


class PrefillNode:
    """The prefill node on a fixed port, restartable."""

    def __init__(self):
        self.port, self.http_port = free_port(), free_port()
        self.proc = None
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_process([sys.executable, "-m", "pd.prefill", "--port", str(self.port), "--http-port",
                                   str(self.http_port), "--lease-timeout", "5", *ENGINE], "pd-prefill ready:",
                                  timeout=180)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive

    def ensure_running(self) -> None:
        if not self.alive:
            self.start()

    def node_id(self) -> str:
        return httpx.get(self.http + "/health", timeout=10).json()["node_id"]

    def num_running(self) -> float:
        try:
            return metrics(self.http)["vllm:num_requests_running"]
        except httpx.HTTPError:
            return 0

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)
            self.proc.stop()


def wait_connected(decode, prefill: PrefillNode, timeout: float = 30.0) -> None:
    """Until the decode node logs a handshake with the prefill node's current process."""
    node_id = prefill.node_id()
    wait_for(lambda: f"({node_id}), transport" in log_text(decode), timeout,
             f"the decode node to connect to {node_id}", interval=0.2)


def wait_reconnected(decode, prefill: PrefillNode, num_before: int, timeout: float = 30.0) -> None:
    """Until the decode node logs one more handshake with the prefill node's current process."""
    node_id = prefill.node_id()
    wait_for(lambda: log_text(decode).count(f"({node_id}), transport") > num_before, timeout,
             f"the decode node to reconnect to {node_id}", interval=0.2)


def start_decode(*extra: str):
    return start_process([sys.executable, "-m", "pd.decode", "--port", str(free_port()), "--max-num-seqs", "16",
                          *ENGINE, *PD_TIMEOUTS, *extra], "pd-decode ready:", timeout=180)


def concurrently(fn, items) -> list:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def prefill():
    node = PrefillNode()
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def closed_port() -> int:
    return free_port()  # nobody listens there


@pytest.fixture(scope="module")
def decodes(prefill, closed_port):
    started: dict = {}
    try:
        with ThreadPoolExecutor(2) as pool:
            futs = {"decode": pool.submit(start_decode, "--pd-url", prefill.address, "--pd-transport", "auto"),
                    "closed": pool.submit(start_decode, "--pd-url", f"127.0.0.1:{closed_port}")}
            for name, f in futs.items():
                started[name] = f.result()
        wait_connected(started["decode"], prefill)
        yield started
    finally:
        concurrently(lambda p: p.stop(), list(started.values()))


@pytest.fixture(scope="module")
def decode(decodes):
    return decodes["decode"]


@pytest.fixture(scope="module")
def reference(decodes) -> dict[int, tuple[str, int]]:
    """Greedy answers of the node that prefills everything itself (keyed by id(messages))."""
    base = decodes["closed"].base_url
    return {id(m): answer(base, m) for m in [*LONG, *HANG, *AFTER_RESTART]}


# ---- (d) a prefill node that is not there -------------------------------------------------------

def test_closed_port_decode_starts_and_serves_everything_locally(decodes, closed_port, reference):
    node = decodes["closed"]
    logs = log_text(node)
    line = next(ln for ln in logs.splitlines() if f"127.0.0.1:{closed_port} unavailable" in ln)
    assert "cannot reach prefill node" in line, line
    counts = [httpx.post(node.base_url + "/tokenize", json={"model": MODEL, "messages": m}, timeout=30)
              .json()["count"] for m in LONG]
    assert 1_350 <= counts[0] <= 1_650 and min(counts) >= 900, counts
    for text, n in reference.values():
        assert text.strip() and n > 0
    m = metrics(node.base_url)
    assert sum_of(m, "pdserve:kv_transfers_total") == 0
    assert sum_of(m, "pdserve:pd_local_prefills_total", cause="no_healthy") == len(reference)
    assert httpx.get(node.base_url + "/health", timeout=10).status_code == 200
    assert blocks_all_free(node.base_url)


# ---- (a) SIGKILL mid-transfer -----------------------------------------------------------------

def test_sigkill_prefill_node_mid_transfer_every_request_completes(decode, prefill, reference):
    assert blocks_all_free(decode.base_url)
    before = metrics(decode.base_url)
    with ThreadPoolExecutor(len(LONG)) as pool:
        futures = [pool.submit(answer, decode.base_url, m) for m in LONG]
        wait_for(lambda: prefill.num_running() >= 1, 120, "the prefill node to start the long prompts")
        time.sleep(0.5)
        prefill.kill()
        results = [f.result(timeout=300) for f in futures]
    for m, got in zip(LONG, results):
        assert got == reference[id(m)]
    assert httpx.get(decode.base_url + "/health", timeout=10).status_code == 200
    wait_for(lambda: blocks_all_free(decode.base_url), 20, "the decode node's blocks to be free again")
    after = metrics(decode.base_url)
    assert sum_of(after, "pdserve:kv_transfers_total") == sum_of(before, "pdserve:kv_transfers_total")
    failed = sum_of(after, "pdserve:kv_transfer_failures_total") - sum_of(before, "pdserve:kv_transfer_failures_total")
    # a request the decode node had not dispatched yet when the node went down is prefilled
    # locally without a failed transfer ("no healthy prefill node")
    local = sum_of(after, "pdserve:pd_local_prefills_total") - sum_of(before, "pdserve:pd_local_prefills_total")
    assert failed >= 1 and local == len(LONG), (failed, local)
    logs = log_text(decode)
    print("\n".join(ln for ln in logs.splitlines()[-40:] if "fallback" in ln or "marked down" in ln))
    assert len(re.findall(r"fallback req-\d+: .*; prefilling locally", logs)) >= len(LONG)
    assert f"prefill node {prefill.address} marked down" in logs


# ---- (c) restart on the same port ------------------------------------------------------------------

def test_first_request_after_restart_is_prefilled_remotely(decode, prefill, reference):
    """A fresh prefill node (empty prefix cache) must stream from the decode node's cached
    prefix end (here: the shared system-prompt block), not from its own cache start (0)."""
    assert not prefill.alive  # killed by the previous test
    prefill.start()
    wait_connected(decode, prefill)
    before = metrics(decode.base_url)
    assert answer(decode.base_url, AFTER_RESTART[0]) == reference[id(AFTER_RESTART[0])]
    after = metrics(decode.base_url)
    failures = [sum_of(m, "pdserve:kv_transfer_failures_total") for m in (before, after)]
    assert failures[0] == failures[1], log_text(decode)[-2000:]
    assert sum_of(after, "pdserve:kv_transfers_total", transport="local") == \
        sum_of(before, "pdserve:kv_transfers_total", transport="local") + 1


def test_restarted_prefill_node_reconnects_and_transfers_resume(decode, prefill, reference):
    prefill.ensure_running()
    wait_connected(decode, prefill)
    assert log_text(decode).count("connected to prefill node") >= 2
    before = metrics(decode.base_url)
    m = AFTER_RESTART[1]
    assert answer(decode.base_url, m) == reference[id(m)]
    after = metrics(decode.base_url)
    assert sum_of(after, "pdserve:kv_transfers_total", transport="local") > \
        sum_of(before, "pdserve:kv_transfers_total", transport="local")
    wait_for(lambda: blocks_all_free(decode.base_url), 20, "the decode node's blocks to be free again")
    wait_for(lambda: blocks_all_free(prefill.http), 20, "the prefill node's blocks to be free again")


# ---- (b) SIGSTOP (a hung prefill node), then SIGCONT ---------------------------------------------

def test_sigstop_prefill_node_requests_complete_then_remote_prefill_resumes(decode, prefill, reference):
    prefill.ensure_running()
    wait_connected(decode, prefill)
    node_id = prefill.node_id()
    wait_for(lambda: blocks_all_free(prefill.http), 20, "the prefill node's baseline")
    assert blocks_all_free(decode.base_url)
    before = metrics(decode.base_url)
    connects_before = log_text(decode).count(f"({node_id}), transport")
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(HANG)) as pool:
            futures = [pool.submit(answer, decode.base_url, m) for m in HANG]
            wait_for(lambda: prefill.num_running() >= 1, 60, "the prefill node to start the prompts")
            time.sleep(0.3)
            prefill.proc.signal(signal.SIGSTOP)
            results = [f.result(timeout=120) for f in futures]
        elapsed = time.monotonic() - t0
        for m, got in zip(HANG, results):
            assert got == reference[id(m)]
        assert elapsed < 60, elapsed
        assert httpx.get(decode.base_url + "/health", timeout=10).status_code == 200
        wait_for(lambda: blocks_all_free(decode.base_url), 20, "the decode node's blocks to be free again")
        mid = metrics(decode.base_url)
        assert sum_of(mid, "pdserve:kv_transfer_failures_total") - \
            sum_of(before, "pdserve:kv_transfer_failures_total") == len(HANG), log_text(decode)[-3000:]
        logs = log_text(decode)
        print("\n".join(ln for ln in logs.splitlines()[-40:] if "fallback" in ln or "marked down" in ln))
        assert re.search(r"fallback req-\d+: (no KV within 3 s|transfer exceeded 10 s)", logs), logs[-3000:]
        assert f"prefill node {prefill.address} marked down" in logs
    finally:
        prefill.proc.signal(signal.SIGCONT)

    # resumed: health checks recover, the decode node handshakes again, remote prefill resumes
    wait_reconnected(decode, prefill, connects_before, timeout=40)
    n = sum_of(metrics(decode.base_url), "pdserve:kv_transfers_total", transport="local")
    text, tokens = answer(decode.base_url, AFTER_RESUME)
    assert text.strip() and tokens > 0
    assert sum_of(metrics(decode.base_url), "pdserve:kv_transfers_total", transport="local") == n + 1
    # the prefill node freed the hung requests' blocks (aborted, or leases released / expired)
    wait_for(lambda: blocks_all_free(prefill.http), 20, "the prefill node's blocks to be free again")
    wait_for(lambda: blocks_all_free(decode.base_url), 20, "the decode node's blocks to be free again")


def test_a_transfer_deadline_counts_as_a_timeout():
    """The two deadlines of DecodeConnector._stream() cancel a stream that sends nothing
    (a hung prefill node) and fail the transfer with cause "timeout"."""
    import threading

    import grpc

    from pd._generated import prefill_pb2 as pb
    from pd.decode.metrics import failure_cause
    from pd.decode.pd_connector import DecodeConnector, PDPolicy, Transfer, TransferFailed

    class Cancelled(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.CANCELLED

        def details(self):
            return "Locally cancelled by application!"

    class HungStream:  # a PrefillStream call whose server never answers
        reused = False

        def __init__(self, owner):
            self.owner, self.cancelled = owner, threading.Event()

        def __iter__(self):
            self.cancelled.wait(30)
            raise Cancelled()
            yield  # a generator

        def cancel(self, owner=None):
            self.cancelled.set()

    ended = []

    def reason_for(policy: PDPolicy) -> str:
        peer = SimpleNamespace(start_transfer=lambda message, owner, fresh: HungStream(owner),
                               end_transfer=lambda stream, complete: ended.append(complete),
                               local_pool=None, transport="grpc", address="127.0.0.1:1")
        t = Transfer("req-0", peer, list(range(32)), 0, [0, 1], pb.PrefillRequest(), False)
        with pytest.raises(TransferFailed) as info:
            DecodeConnector([], policy)._stream(t)
        return str(info.value)

    first_chunk = reason_for(PDPolicy(first_chunk_timeout_s=0.2, transfer_timeout_s=30))
    deadline = reason_for(PDPolicy(first_chunk_timeout_s=30, transfer_timeout_s=0.2))
    assert "first-chunk" in first_chunk and failure_cause(first_chunk) == "timeout", first_chunk
    assert "exceeded" in deadline and failure_cause(deadline) == "timeout", deadline
    assert ended == [False, False]  # neither stream goes back to the idle list


# ---- (e) --pd-failure fail ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decode_fail(prefill):
    prefill.ensure_running()
    proc = start_decode("--pd-url", prefill.address, "--pd-transport", "grpc", "--pd-failure", "fail")
    yield proc
    proc.stop()


def test_failure_policy_fail_returns_an_openai_error_and_stays_healthy(decode_fail, prefill):
    wait_connected(decode_fail, prefill)
    assert blocks_all_free(decode_fail.base_url)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(chat, decode_fail.base_url, FAIL)
        wait_for(lambda: prefill.num_running() >= 1, 60, "the prefill node to start the prompt")
        time.sleep(0.3)
        prefill.kill()
        r = future.result(timeout=120)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert "remote prefill failed" in err["message"] and err["type"], err
    assert httpx.get(decode_fail.base_url + "/health", timeout=10).status_code == 200
    wait_for(lambda: blocks_all_free(decode_fail.base_url), 20, "the decode node's blocks to be free again")
    m = metrics(decode_fail.base_url)
    assert sum_of(m, "pdserve:kv_transfer_failures_total") == 1
    assert sum_of(m, "pdserve:request_errors_total", status="500") == 1
    assert re.search(r"fallback req-\d+: .*; failing the request", log_text(decode_fail))
    # the node keeps serving: with its prefill node down, it prefills new requests itself
    text, tokens = answer(decode_fail.base_url, AFTER_RESUME)
    assert text.strip() and tokens > 0
    assert blocks_all_free(decode_fail.base_url)
