"""PD disaggregation is invisible in the output: greedy answers through a prefill node equal
the colocated answers token for token, on both transports.

Real processes: one colocated pd-decode (the reference), and one prefill + decode pair per
transport (gRPC and shared-memory "local"), all float32 with --pd-min-prompt-tokens 16 so
nearly every prompt is prefilled remotely. 20 chat prompts from ~20 to ~1,500 tokens are
sent to each: 12 one after another (two of them share a long prefix with an earlier prompt,
so the prefill node finds it in its prefix cache), then 8 at once. A last test runs the gRPC
transport with fp8 on the wire (lossy: sanity only).
"""
from __future__ import annotations

import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_utils import MODEL, free_port, metrics, parse_metrics, start_process, sum_of, wait_for

ENGINE = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-gb", "0.3", "--log-level", "info"]
DECODE_READY, PREFILL_READY = "pd-decode ready:", "pd-prefill ready:"
NUM_CONCURRENT = 8

# ---- deterministic prompts ---------------------------------------------------------------

_SUBJECTS = ["The old sailor", "A young engineer", "The city council", "My neighbour", "The research team",
             "A quiet librarian", "The village baker", "Our history teacher", "The football coach",
             "A travelling musician", "The night nurse", "The mayor", "A curious child", "The bridge inspector",
             "The orchard owner"]
_VERBS = ["repaired", "described", "painted", "measured", "sold", "borrowed", "discovered", "explained", "cleaned",
          "designed", "visited", "photographed", "counted", "tested", "planted"]
_OBJECTS = ["the wooden boat", "a broken clock", "the train schedule", "three green apples", "the stone wall",
            "a map of the harbour", "the school garden", "an old radio", "the red bicycle", "a basket of bread",
            "the solar panels", "a letter from Paris", "the river bank", "a box of candles", "the north tower"]
_WHEN = ["on Monday morning", "after the storm", "before lunch", "in the spring of 1998", "late at night",
         "during the festival", "at sunrise", "last winter", "every Sunday", "while it was raining"]
_WHY = ["because the roof was leaking", "so that the market could open", "to win a small prize",
        "for the museum", "as a favour to a friend", "after reading the newspaper", "without asking anyone",
        "with great care", "in less than an hour", "for the first time"]
_QUESTIONS = ["Who repaired something, and when?", "Summarize the story in one sentence.",
              "Which object appears most often?", "List two people from the story.",
              "What happened after the storm?", "Give the story a short title.",
              "How much did things cost in total, roughly?", "Who visited the north tower?"]


def story(seed: int, num_sentences: int) -> str:
    """About 17 tokens per sentence of plain, varied English."""
    r = random.Random(seed)
    out = []
    for _ in range(num_sentences):
        out.append(f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_WHEN)} "
                   f"{r.choice(_WHY)}.")
        if r.random() < 0.15:
            out.append(f"It cost {r.randint(2, 900)} coins.")
    return " ".join(out)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def tiny(question: str) -> list[dict]:
    """A ~20-token prompt (a short system message replaces the template's default one)."""
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


BASE_A = story(1000, 76)   # ~1,350 tokens
BASE_B = story(2000, 45)   # ~800 tokens

# (messages, max_tokens); indices 7 and 10 share a long prefix with 6 and 5
SEQUENTIAL = [
    (tiny("What is the capital of Italy?"), 16),
    (user(story(1, 1) + "\n" + _QUESTIONS[0]), 16),
    (user(story(2, 4) + "\n" + _QUESTIONS[1]), 24),
    (user(story(3, 10) + "\n" + _QUESTIONS[2]), 16),
    (user(story(4, 25) + "\n" + _QUESTIONS[3]), 16),
    (user(BASE_B + "\n" + _QUESTIONS[4]), 16),
    (user(BASE_A + "\n" + _QUESTIONS[5]), 24),
    (user(BASE_A + " " + story(1001, 5) + "\n" + _QUESTIONS[6]), 16),
    (tiny("Name a primary colour."), 16),
    (user(story(5, 18) + "\n" + _QUESTIONS[7]), 16),
    (user(BASE_B + " " + story(2001, 4) + "\n" + _QUESTIONS[1]), 16),
    (user(story(6, 7) + "\n" + _QUESTIONS[5]), 24),
]
CONCURRENT = [(tiny("Say hello in French."), 16)] + [
    (user(story(100 + i, n) + "\n" + _QUESTIONS[i % len(_QUESTIONS)]), 16)
    for i, n in enumerate((2, 3, 5, 8, 12, 20, 30))]
ALL = SEQUENTIAL + CONCURRENT
assert len(ALL) == 20 and len(CONCURRENT) == NUM_CONCURRENT


# ---- processes -------------------------------------------------------------------------------

def log_text(proc) -> str:
    """The process's whole output (RunningProcess.logs() keeps only the tail)."""
    with proc._lock:
        return "".join(proc._stdout) + "".join(proc._stderr)


def start_prefill(*extra: str):
    port, http_port = free_port(), free_port()
    proc = start_process([sys.executable, "-m", "pd.prefill", "--port", str(port), "--http-port", str(http_port),
                          *ENGINE, *extra], PREFILL_READY, timeout=180)
    proc.grpc_address = f"127.0.0.1:{port}"
    proc.http_base = f"http://127.0.0.1:{http_port}"
    return proc


def start_decode(*extra: str):
    return start_process([sys.executable, "-m", "pd.decode", "--port", str(free_port()), "--max-num-seqs", "16",
                          *ENGINE, *extra], DECODE_READY, timeout=180)


def pd_flags(prefill, transport: str, *extra: str) -> list[str]:
    return ["--pd-url", prefill.grpc_address, "--pd-transport", transport, "--pd-min-prompt-tokens", "16",
            "--pd-connect-timeout", "5", *extra]


def transfers(m: dict[str, float], transport: str) -> float:
    return sum_of(m, "pdserve:kv_transfers_total", transport=transport)


def failures(m: dict[str, float]) -> float:
    return sum_of(m, "pdserve:kv_transfer_failures_total")


def wait_blocks_free(base_url: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        if m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"] or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


@pytest.fixture(scope="module")
def nodes():
    """colocated, grpc pair, local pair: started in parallel (prefill nodes before their decode nodes)."""
    started: dict = {}
    try:
        with ThreadPoolExecutor(3) as pool:
            futs = {"colo": pool.submit(start_decode), "pf_grpc": pool.submit(start_prefill),
                    "pf_local": pool.submit(start_prefill)}
            for name, f in futs.items():
                started[name] = f.result()
            futs = {"grpc": pool.submit(start_decode, *pd_flags(started["pf_grpc"], "grpc")),
                    "local": pool.submit(start_decode, *pd_flags(started["pf_local"], "local"))}
            for name, f in futs.items():
                started[name] = f.result()
        yield started
    finally:
        with ThreadPoolExecutor(len(started) or 1) as pool:
            list(pool.map(lambda p: p.stop(), started.values()))


def chat(base_url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": True, "top_logprobs": 1}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def run_all(base_url: str) -> list[dict]:
    """The 12 sequential prompts in order, then the 8 concurrent ones at once."""
    out = [chat(base_url, m, n) for m, n in SEQUENTIAL]
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
        out += list(pool.map(lambda a: chat(base_url, *a), CONCURRENT))
    return out


def summary(resp: dict) -> dict:
    choice = resp["choices"][0]
    content = choice["logprobs"]["content"]
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "completion_tokens": resp["usage"]["completion_tokens"],
            "prompt_tokens": resp["usage"]["prompt_tokens"],
            "tokens": [t["token"] for t in content], "logprobs": [t["logprob"] for t in content]}


_results: dict[str, list[dict]] = {}


def results_of(nodes, name: str) -> list[dict]:
    if name not in _results:
        _results[name] = [summary(r) for r in run_all(nodes[name].base_url)]
    return _results[name]


# ---- tests ---------------------------------------------------------------------------------------

def test_prompt_lengths_span_20_to_1500_tokens(nodes):
    base = nodes["colo"].base_url
    counts = [httpx.post(base + "/tokenize", json={"model": MODEL, "messages": m}, timeout=30).json()["count"]
              for m, _ in ALL]
    assert min(counts) <= 30 and 1_300 <= max(counts) <= 1_600, counts
    assert all(15 <= c <= 1_600 for c in counts), counts
    assert sum(c >= 500 for c in counts) >= 4, counts


def test_colocated_reference(nodes):
    ref = results_of(nodes, "colo")
    for r in ref:
        assert r["text"] and r["completion_tokens"] == len(r["tokens"]) > 0
    m = metrics(nodes["colo"].base_url)
    assert transfers(m, "grpc") == transfers(m, "local") == 0


@pytest.mark.parametrize("transport", ["grpc", "local"])
def test_pd_greedy_equals_colocated_token_for_token(nodes, transport):
    decode, prefill = nodes[transport], nodes[f"pf_{transport}"]
    before = metrics(decode.base_url)
    got = results_of(nodes, transport)
    ref = results_of(nodes, "colo")
    after = metrics(decode.base_url)
    mismatches = []
    for i, (g, r) in enumerate(zip(got, ref)):
        same = (g["text"], g["completion_tokens"], g["tokens"], g["finish_reason"], g["prompt_tokens"]) == \
               (r["text"], r["completion_tokens"], r["tokens"], r["finish_reason"], r["prompt_tokens"])
        if not same:
            mismatches.append((i, g["tokens"], r["tokens"]))
    assert not mismatches, mismatches
    for i, (g, r) in enumerate(zip(got, ref)):  # same tokens; logprobs agree to float32 noise
        assert max(abs(a - b) for a, b in zip(g["logprobs"], r["logprobs"])) < 0.05, (i, g, r)

    # transfers really happened, on this transport only, none failed
    n = transfers(after, transport) - transfers(before, transport)
    other = "local" if transport == "grpc" else "grpc"
    assert n >= 16, (n, log_text(decode)[-4000:])
    assert transfers(after, other) == 0
    assert failures(after) == 0, log_text(decode)[-4000:]
    assert len(re.findall(rf"transfer req-\d+: .*transport {transport} ", log_text(decode))) == n
    pm = metrics(prefill.http_base)
    # the prefill node counts every transfer, even when the decode node drops the stream
    # right after the last message
    assert sum_of(pm, "pdserve:prefill_transfers_total", transport=transport) == n

    # the prompts sharing a long prefix found it cached on the prefill node
    cached_here = [int(x) for x in re.findall(r"\((\d+) cached here\)", log_text(prefill))]
    cached_there = [int(x) for x in re.findall(r"(\d+) tokens cached there", log_text(decode))]
    assert max(cached_here) >= 700 and max(cached_there) >= 700, (cached_here, cached_there)

    # every block is free again on both nodes (leases released for the local transport)
    for base in (decode.base_url, prefill.http_base):
        m = wait_blocks_free(base)
        assert m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"], base
    assert metrics(decode.base_url)["vllm:num_requests_running"] == 0


@pytest.fixture(scope="module")
def fp8_decode(nodes):
    proc = start_decode(*pd_flags(nodes["pf_grpc"], "grpc", "--pd-wire-dtype", "float8_e4m3fn"))
    yield proc
    proc.stop()


def test_fp8_wire_produces_output_and_transfers(nodes, fp8_decode):
    ref = results_of(nodes, "colo")
    picks = [3, 4, 9]  # fresh prompts of ~220-480 tokens
    before = metrics(fp8_decode.base_url)
    got = [summary(chat(fp8_decode.base_url, *SEQUENTIAL[i])) for i in picks]
    after = metrics(fp8_decode.base_url)
    for g, i in zip(got, picks):
        assert g["text"].strip() and g["completion_tokens"] > 0
        assert g["prompt_tokens"] == ref[i]["prompt_tokens"]
    assert transfers(after, "grpc") - transfers(before, "grpc") == len(picks), log_text(fp8_decode)[-3000:]
    assert failures(after) == 0
    # the first token is sampled on the prefill node (full-precision KV there)
    assert all(g["tokens"][0] == ref[i]["tokens"][0] for g, i in zip(got, picks))
    # fp8 KV is lossy: no equality requirement for the rest
    same = sum(g["tokens"] == ref[i]["tokens"] for g, i in zip(got, picks))
    print(f"fp8 wire: {same}/{len(picks)} answers equal the colocated ones")
    m = wait_blocks_free(fp8_decode.base_url)
    assert m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"]


# ---- prefill-side accounting (in process, tiny model: deterministic) ----------------------------

def test_prefill_node_counts_a_transfer_whose_stream_is_dropped_after_done(tmp_path):
    import asyncio

    from engine.api import EngineBuilder, ModelRepo
    from engine.async_engine import AsyncEngine
    from engine.sampling_params import SamplingParams
    from pd._generated import prefill_pb2 as pb
    from pd.prefill.connector import PrefillConnector
    from pd.prefill.metrics import PrefillMetrics
    from pd.prefill.service import PrefillServicer
    from pd.transport.messages import sampling_to_pb
    from tiny_models import build_tiny_model_dir

    path, _ = build_tiny_model_dir("llama", tmp_path)
    connector = PrefillConnector()
    llm = (EngineBuilder(ModelRepo.dir(str(path))).dtype("float32").kv_cache_gb(0.01)
           .connector(connector).build_llm_engine())
    engine = AsyncEngine(llm).start()
    prefill_metrics = PrefillMetrics("tiny", llm.stats)
    servicer = PrefillServicer(engine, connector, None, metrics=prefill_metrics)
    request = pb.PrefillRequest(request_id="req-0", token_ids=list(range(5, 45)), transport="grpc",
                                sampling=sampling_to_pb(SamplingParams(max_tokens=16, temperature=0.0)))

    async def read_until_done() -> int:
        stream = servicer.Prefill(request, None)
        n = 0
        async for msg in stream:
            n += 1
            if isinstance(msg, bytes):  # KV messages come pre-serialized
                msg = pb.PrefillMessage.FromString(msg)
            if msg.WhichOneof("payload") == "done":
                break
        await stream.aclose()  # what a cancelled RPC does to the handler once "done" is out
        return n

    try:
        assert asyncio.run(read_until_done()) > 1
    finally:
        engine.shutdown()
    m = parse_metrics(prefill_metrics.render().decode())
    assert m.get('pdserve:prefill_transfers_total{model_name="tiny",transport="grpc"}') == 1.0


def test_prefill_stream_answers_requests_in_turn_and_a_dropped_call_frees_everything(tmp_path):
    """PrefillStream on one call: each request is answered up to its Done like Prefill
    would answer it; a call dropped mid-request aborts that prefill and frees its blocks."""
    import asyncio

    from engine.api import EngineBuilder, ModelRepo
    from engine.async_engine import AsyncEngine
    from engine.sampling_params import SamplingParams
    from pd._generated import prefill_pb2 as pb
    from pd.prefill.connector import PrefillConnector
    from pd.prefill.service import PrefillServicer
    from pd.transport.kv_frames import read_kv_message
    from pd.transport.messages import sampling_to_pb
    from tiny_models import build_tiny_model_dir

    path, _ = build_tiny_model_dir("llama", tmp_path)
    connector = PrefillConnector()
    llm = (EngineBuilder(ModelRepo.dir(str(path))).dtype("float32").kv_cache_gb(0.01)
           .connector(connector).build_llm_engine())
    engine = AsyncEngine(llm).start()
    servicer = PrefillServicer(engine, connector, None, max_message_bytes=4096)
    sampling = sampling_to_pb(SamplingParams(max_tokens=16, temperature=0.0))
    prompts = [list(range(5, 45)), list(range(100, 133)), list(range(200, 260))]
    free_at_start = llm.stats().num_free_blocks

    async def one_call(requests_to_answer: int, drop_after_kv: bool) -> list[tuple[int, int]]:
        """Sends the prompts one at a time on one PrefillStream call, each after the
        previous Done; returns (KV tokens covered, Done.num_tokens) per answered prompt."""
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (request := await queue.get()) is not None:
                yield request

        call = servicer.PrefillStream(requests(), None)
        answers: list[tuple[int, int]] = []
        for i, tokens in enumerate(prompts):
            await queue.put(pb.PrefillRequest(request_id=f"req-{i}", token_ids=tokens, transport="grpc",
                                              sampling=sampling))
            covered = set()
            async for msg in call:
                chunks = read_kv_message(msg) if isinstance(msg, bytes) else None
                if chunks is not None:
                    covered |= {(c.layer, p) for c in chunks for p in range(c.start, c.start + c.num_tokens)}
                    if drop_after_kv and i == requests_to_answer:
                        await call.aclose()  # what a cancelled call does to the handler
                        return answers
                    continue
                msg = pb.PrefillMessage.FromString(msg) if isinstance(msg, bytes) else msg
                assert msg.WhichOneof("payload") == "done"
                answers.append((len(covered) // llm.pool.layout.num_layers, msg.done.num_tokens))
                break
        await queue.put(None)
        await call.aclose()
        return answers

    try:
        assert asyncio.run(one_call(3, drop_after_kv=False)) == [(len(p), len(p)) for p in prompts]
        assert asyncio.run(one_call(1, drop_after_kv=True)) == [(len(prompts[0]), len(prompts[0]))]
        wait_for(lambda: llm.stats().num_running == 0 and llm.stats().num_free_blocks == free_at_start, 10,
                 "the dropped prefill to be aborted and its blocks freed")
        assert not connector._sinks
    finally:
        engine.shutdown()
