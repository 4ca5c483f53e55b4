"""pd-router end to end, real processes on loopback (bundled SmolLM2, float32).

One router, two prefill and two decode nodes that register themselves with --router-url
(decode nodes with --pd-min-prompt-tokens 16, the router with --min-remote-prefill-tokens
16, so remote prefill is exercised), and one colocated pd-decode as the reference. All
checks of where work ran read the NODES' own counters and session usage, not the router's.

(a) Four sessions x three turns (session_id in the body, the full history resent each turn)
stay on one decode node each, reuse the previous turn's KV, and answer as the colocated
reference does. (b) A decode node is SIGKILLed while requests are in flight: they are
retried on the survivor and succeed, the router reports the node down, and the node,
restarted with the same command, registers again and gets traffic.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from server_utils import MODEL, free_port, parse_metrics, start_process, wait_for

ENGINE = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gb", "0.2", "--threads", "1",
          "--log-level", "info"]
MAX_TOKENS = 16
DECODE_READY, PREFILL_READY, ROUTER_READY = "pd-decode ready:", "pd-prefill ready:", "pd-router ready:"

# Four conversations. Each has its own system message, so the first KV block differs and a
# new session is placed by load (a shared first block would pull every session to one node).
SESSIONS = {
    "sess-astro": ("Astronomy tutor here: answer in one or two short sentences.",
                   ["Tell me something interesting about the moon and its orbit.",
                    "Why does the moon look so bright in the night sky?",
                    "And roughly how far away from the earth is it?"]),
    "sess-python": ("Python programming mentor: keep every answer brief and friendly.",
                    ["What is the Python programming language mostly used for?",
                     "Who created it, and around which year was that?",
                     "Give me one tiny example of a Python function, please."]),
    "sess-rivers": ("Geography quiz master: reply with short, clear facts only.",
                    ["Name three famous rivers of the world for me, please.",
                     "Which one of those three rivers is the longest?",
                     "Through which countries does that long river flow?"]),
    "sess-cats": ("Veterinary helper bot: be warm, short and practical always.",
                  ["What is a good daily routine for an indoor house cat?",
                   "Do cats really sleep for most of the day and night?",
                   "Why do they sleep that much compared with dogs?"]),
}


def single_prompts(tag: str, n: int) -> list[list[dict]]:
    """n stateless chat prompts whose first block is new (a distinct opening system message)."""
    topics = ["volcanoes", "bicycles", "tea", "glaciers", "violins", "bridges", "owls", "deserts", "lighthouses",
              "bees", "trains", "coral reefs"]
    return [[{"role": "system", "content": f"{tag} {i} {topics[i % len(topics)]}: one short sentence."},
             {"role": "user", "content": f"Tell me one surprising fact about {topics[i % len(topics)]}."}]
            for i in range(n)]


# ---- processes -------------------------------------------------------------------------------

class Cluster:
    def __init__(self):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.router_url = f"127.0.0.1:{self.grpc_port}"
        self.router = None
        self.prefills: list = []
        self.decodes: dict[int, object] = {}   # port -> process
        self.ref = None

    def router_cmd(self) -> list[str]:
        return [sys.executable, "-m", "pd.router", "--host", "127.0.0.1", "--port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--min-remote-prefill-tokens", "16", "--health-interval", "1",
                "--log-level", "info"]

    def prefill_cmd(self) -> list[str]:
        return [sys.executable, "-m", "pd.prefill", "--host", "127.0.0.1", "--port", str(free_port()),
                "--http-port", str(free_port()), "--router-url", self.router_url, *ENGINE]

    def decode_cmd(self, port: int, routed: bool = True) -> list[str]:
        extra = ["--router-url", self.router_url, "--pd-min-prompt-tokens", "16"] if routed else []
        return [sys.executable, "-m", "pd.decode", "--host", "127.0.0.1", "--port", str(port), *ENGINE, *extra]

    @property
    def all(self) -> list:
        return [p for p in [self.router, *self.prefills, *self.decodes.values(), self.ref] if p is not None]

    def stop(self) -> None:
        """Nodes first (they deregister), then the router."""
        nodes = [p for p in self.all if p is not self.router]
        with ThreadPoolExecutor(len(nodes) or 1) as ex:
            list(ex.map(lambda p: p.stop(10), nodes))
        if self.router is not None:
            self.router.stop(10)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    ports = [free_port(), free_port()]
    jobs = {"router": (c.router_cmd(), ROUTER_READY), "prefill0": (c.prefill_cmd(), PREFILL_READY),
            "prefill1": (c.prefill_cmd(), PREFILL_READY), "ref": (c.decode_cmd(free_port(), routed=False), DECODE_READY),
            **{f"decode{p}": (c.decode_cmd(p), DECODE_READY) for p in ports}}
    started, errors = {}, []
    with ThreadPoolExecutor(len(jobs)) as ex:
        futures = {name: ex.submit(start_process, cmd, marker, 240) for name, (cmd, marker) in jobs.items()}
        for name, f in futures.items():
            try:
                started[name] = f.result()
            except Exception as exc:  # noqa: BLE001 - stop the others, then fail
                errors.append(f"{name}: {exc}")
    c.router, c.ref = started.get("router"), started.get("ref")
    c.prefills = [started[k] for k in ("prefill0", "prefill1") if k in started]
    c.decodes = {p: started[f"decode{p}"] for p in ports if f"decode{p}" in started}
    if errors:
        c.stop()
        pytest.fail("\n".join(errors))
    try:
        wait_for(lambda: len([n for n in router_nodes(c) if n["registered"] and n["healthy"]]) == 4, 60,
                 "all four nodes to register with the router")
    except AssertionError:
        c.stop()
        raise
    yield c
    c.stop()


# ---- helpers ----------------------------------------------------------------------------------

def router_nodes(c: Cluster) -> list[dict]:
    r = httpx.get(f"http://127.0.0.1:{c.http_port}/router/nodes", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["nodes"]


def decode_entry(c: Cluster, port: int) -> dict | None:
    return next((n for n in router_nodes(c) if n["role"] == "decode" and n["address"] == f"http://127.0.0.1:{port}"),
                None)


def metrics(proc) -> dict[str, float]:
    r = httpx.get(proc.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    return parse_metrics(r.text)


def total(m: dict[str, float], name: str) -> float:
    """Sum of all labelled samples of a counter/gauge."""
    return sum(v for k, v in m.items() if k.startswith(name + "{"))


def router_metrics(c: Cluster) -> dict[str, float]:
    r = httpx.get(f"http://127.0.0.1:{c.http_port}/metrics", timeout=10)
    assert r.status_code == 200
    return parse_metrics(r.text)


def node_up(c: Cluster, node_id: str) -> float | None:
    m = router_metrics(c)
    return next((v for k, v in m.items() if k.startswith("pdserve:router_node_up{") and f'node="{node_id}"' in k),
                None)


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=180)


def ask(cl: OpenAI, messages: list[dict], session_id: str | None = None):
    return cl.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"session_id": session_id} if session_id else None)


def run_turns(cl: OpenAI, sid: str, history: list[dict], questions: list[str]) -> list:
    """Sends each question with the full history so far; appends to history; returns responses."""
    out = []
    for q in questions:
        history.append({"role": "user", "content": q})
        r = ask(cl, history, sid)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        out.append(r)
    return out


def usage_on(proc, sid: str) -> httpx.Response:
    return httpx.get(proc.url + "/usage", params={"session_id": sid}, timeout=10)


def decode_load(c: Cluster, port: int) -> float:
    e = decode_entry(c, port)
    return e["load"] if e else 0.0


# ---- registration ----------------------------------------------------------------------------

def test_nodes_register_with_the_router(cluster):
    nodes = router_nodes(cluster)
    by_role = {r: sorted(n["address"] for n in nodes if n["role"] == r) for r in ("decode", "prefill")}
    assert by_role["decode"] == sorted(f"http://127.0.0.1:{p}" for p in cluster.decodes)
    prefill_ports = sorted(int(p.args[p.args.index("--port") + 1]) for p in cluster.prefills)
    assert by_role["prefill"] == sorted(f"127.0.0.1:{p}" for p in prefill_ports)
    assert all(n["registered"] and n["healthy"] for n in nodes)
    assert all(node_up(cluster, n["node_id"]) == 1.0 for n in nodes)
    health = httpx.get(f"http://127.0.0.1:{cluster.http_port}/health", timeout=10).json()
    assert health["decode_nodes"] == 2 and health["prefill_nodes"] == 2


# ---- (a) sessions --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sessions(cluster):
    """All four conversations through the router and on the reference; node counters before/after."""
    c = cluster
    before = {p: metrics(proc) for p, proc in c.decodes.items()}
    router_before = router_metrics(c)
    rc, ref = client(f"http://127.0.0.1:{c.http_port}/v1"), client(c.ref.url)
    histories = {sid: [{"role": "system", "content": system}] for sid, (system, _) in SESSIONS.items()}
    routed: dict[str, list] = {}
    # first turns one at a time: a new session goes to the least loaded node, and load (KV held
    # by resident sessions) reaches the router with the nodes' heartbeats
    for sid, (_, questions) in SESSIONS.items():
        loads = {p: decode_load(c, p) for p in c.decodes}
        routed[sid] = run_turns(rc, sid, histories[sid], questions[:1])
        home = next(p for p, proc in c.decodes.items() if usage_on(proc, sid).status_code == 200)
        wait_for(lambda: decode_load(c, home) > loads[home], 10, "the serving node's load report")
    # later turns one request at a time too (nothing else in the decode node's step: see
    # test_later_turns_equal_the_colocated_reference)
    for sid, (_, questions) in SESSIONS.items():
        routed[sid] += run_turns(rc, sid, histories[sid], questions[1:])
    with ThreadPoolExecutor(4) as ex:
        reference = dict(zip(SESSIONS, ex.map(
            lambda sid: run_turns(ref, sid, [{"role": "system", "content": SESSIONS[sid][0]}], SESSIONS[sid][1]),
            SESSIONS)))
    after = {p: metrics(proc) for p, proc in c.decodes.items()}
    return {"routed": routed, "reference": reference, "histories": histories, "before": before, "after": after,
            "router_before": router_before, "router_after": router_metrics(c)}


def home_nodes(cluster, sessions) -> dict[str, int]:
    homes = {}
    for sid in SESSIONS:
        answers = {p: usage_on(proc, sid) for p, proc in cluster.decodes.items()}
        on = [p for p, r in answers.items() if r.status_code == 200]
        assert len(on) == 1, f"{sid}: known to {on}"
        assert all(r.status_code == 404 for p, r in answers.items() if p not in on)
        homes[sid] = on[0]
    return homes


def test_each_session_stays_on_one_decode_node(cluster, sessions):
    homes = home_nodes(cluster, sessions)
    for sid, port in homes.items():
        u = usage_on(cluster.decodes[port], sid).json()
        turns = sessions["routed"][sid]
        assert u["turns"] == 3
        assert u["prompt_tokens"] == sum(r.usage.prompt_tokens for r in turns)
        assert u["completion_tokens"] == sum(r.usage.completion_tokens for r in turns)
        assert u["cached_tokens"] == sum(r.usage.prompt_tokens_details.cached_tokens for r in turns)
    # the nodes' own counters: 3 requests and one resident session per session placed there
    for port in cluster.decodes:
        mine = [sid for sid, p in homes.items() if p == port]
        b, a = sessions["before"][port], sessions["after"][port]
        assert total(a, "vllm:request_success_total") - total(b, "vllm:request_success_total") == 3 * len(mine)
        assert total(a, "pdserve:sessions_resident") - total(b, "pdserve:sessions_resident") == len(mine)
    # placement by load spread the new sessions over both nodes (else "stays" proves little)
    assert set(homes.values()) == set(cluster.decodes), homes
    rb, ra = sessions["router_before"], sessions["router_after"]
    key = 'pdserve:router_decisions_total{policy="cache_aware",reason="session affinity"}'
    assert ra.get(key, 0) - rb.get(key, 0) == 2 * len(SESSIONS)


def test_each_turn_reuses_the_previous_turn(sessions):
    for sid, turns in sessions["routed"].items():
        for prev, cur in zip(turns, turns[1:]):
            cached = cur.usage.prompt_tokens_details.cached_tokens
            # token-granular session cache: the whole previous prompt and answer, partial block
            # included (the session holds exactly those tokens, so this is also the most it can be)
            assert cached == prev.usage.prompt_tokens + prev.usage.completion_tokens, (sid, cached, prev.usage)
            assert cached < cur.usage.prompt_tokens


def test_first_turns_equal_the_colocated_reference(sessions):
    """A first turn is prefilled on a prefill node (whole prompt) or locally: same greedy answer."""
    for sid in SESSIONS:
        routed, ref = sessions["routed"][sid][0], sessions["reference"][sid][0]
        assert routed.choices[0].message.content == ref.choices[0].message.content, sid
        assert (routed.usage.prompt_tokens, routed.usage.completion_tokens) == \
            (ref.usage.prompt_tokens, ref.usage.completion_tokens), sid


def test_later_turns_equal_the_colocated_reference(sessions):
    for sid in SESSIONS:
        routed, ref = sessions["routed"][sid], sessions["reference"][sid]
        assert [r.choices[0].message.content for r in routed] == [r.choices[0].message.content for r in ref], sid
        assert [(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens)
                for r in routed[1:]] == \
            [(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens)
             for r in ref[1:]], sid


def test_remote_prefill_is_exercised_without_failures(cluster, sessions):
    def delta(name):
        return sum(total(sessions["after"][p], name) - total(sessions["before"][p], name) for p in cluster.decodes)

    num_requests = sum(len(turns) for turns in sessions["routed"].values())
    transfers = delta("pdserve:kv_transfers_total")
    # every prompt's uncached part is >= 16 tokens; only the first use of each (decode, prefill) pair
    # prefills locally while the decode node connects to the prefill node the router named
    assert transfers >= num_requests - len(cluster.decodes) * len(cluster.prefills)
    assert delta("pdserve:kv_transfer_failures_total") == 0
    rb, ra = sessions["router_before"], sessions["router_after"]
    assert ra["pdserve:router_remote_prefills_total"] - rb["pdserve:router_remote_prefills_total"] >= transfers


def test_router_index_sees_the_sessions_cached_prefix(sessions):
    rb, ra = sessions["router_before"], sessions["router_after"]
    later_turns = sum(len(turns) - 1 for turns in sessions["routed"].values())
    assert ra["pdserve:router_cache_hits_total"] - rb["pdserve:router_cache_hits_total"] >= later_turns
    assert ra["pdserve:router_cached_tokens_total"] > rb["pdserve:router_cached_tokens_total"]


# ---- load spreading ---------------------------------------------------------------------------

def test_a_burst_of_new_requests_uses_both_decode_nodes(cluster, sessions):
    c = cluster
    before = {p: total(metrics(proc), "vllm:request_success_total") for p, proc in c.decodes.items()}
    barrier = threading.Barrier(4)
    url = f"http://127.0.0.1:{c.http_port}/v1/chat/completions"

    def send(messages):
        with httpx.Client(timeout=180) as h:
            barrier.wait()
            return h.post(url, json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0})

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(send, single_prompts("Burst", 4)))
    assert all(r.status_code == 200 for r in results)
    served = {p: total(metrics(proc), "vllm:request_success_total") - before[p] for p, proc in c.decodes.items()}
    assert sum(served.values()) == 4
    assert all(n > 0 for n in served.values()), served


# ---- (b) losing a decode node -------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(cluster, sessions):
    """SIGKILLs a decode node that is running requests sent through the router."""
    c = cluster
    retries_before = router_metrics(c)["pdserve:router_retries_total"]
    ids = {p: decode_entry(c, p)["node_id"] for p in c.decodes}
    prompts = single_prompts("Outage", 6)
    url = f"http://127.0.0.1:{c.http_port}/v1/chat/completions"

    def send(messages):
        with httpx.Client(timeout=180) as h:
            return h.post(url, json={"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS,
                                     "temperature": 0})

    def running(port) -> float:
        try:
            return total(metrics(c.decodes[port]), "vllm:num_requests_running")
        except httpx.HTTPError:
            return 0.0

    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(send, m) for m in prompts]
        victim = wait_for(lambda: next((p for p in c.decodes if running(p) >= 1), None), 60,
                          "a decode node to run the requests")
        c.decodes[victim].proc.kill()
        c.decodes[victim].wait(10)
        results = [f.result() for f in futures]
    survivor = next(p for p in c.decodes if p != victim)
    return {"victim": victim, "survivor": survivor, "ids": ids, "prompts": prompts, "results": results,
            "retries_before": retries_before}


def test_requests_in_flight_on_the_killed_node_are_retried_and_succeed(cluster, killed):
    c = cluster
    results = killed["results"]
    assert [r.status_code for r in results] == [200] * len(results), [r.text[:200] for r in results]
    assert router_metrics(c)["pdserve:router_retries_total"] - killed["retries_before"] >= 1
    ref = client(c.ref.url)
    expected = [ask(ref, m).choices[0].message.content for m in killed["prompts"]]
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == expected


def test_router_reports_the_killed_node_down(cluster, killed):
    c = cluster
    victim_id = killed["ids"][killed["victim"]]

    def down():
        entry = next((n for n in router_nodes(c) if n["node_id"] == victim_id), None)
        return entry is None or not entry["healthy"]

    wait_for(down, 10, "the router to mark the killed node down")
    assert node_up(c, victim_id) in (0.0, None)
    assert node_up(c, killed["ids"][killed["survivor"]]) == 1.0
    health = httpx.get(f"http://127.0.0.1:{c.http_port}/health", timeout=10)
    assert health.status_code == 200 and health.json()["decode_nodes"] == 1


def test_new_requests_go_to_the_survivor(cluster, killed):
    c = cluster
    survivor = c.decodes[killed["survivor"]]
    before = total(metrics(survivor), "vllm:request_success_total")
    rc = client(f"http://127.0.0.1:{c.http_port}/v1")
    for messages in single_prompts("Survivor", 2):
        assert ask(rc, messages).choices[0].finish_reason in ("stop", "length")
    assert total(metrics(survivor), "vllm:request_success_total") - before == 2


def test_a_session_of_the_killed_node_continues_on_the_survivor(cluster, sessions, killed):
    """The full history is resent, so a session whose node died goes on on the survivor."""
    c = cluster
    survivor = c.decodes[killed["survivor"]]
    sid = next(s for s in SESSIONS if usage_on(survivor, s).status_code == 404)
    history = sessions["histories"][sid]
    last = sessions["routed"][sid][-1]
    r = ask(client(f"http://127.0.0.1:{c.http_port}/v1"),
            history + [{"role": "user", "content": "Thank you! Can you sum that up in a few words?"}], sid)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert r.usage.prompt_tokens > last.usage.prompt_tokens + last.usage.completion_tokens  # whole history
    u = usage_on(survivor, sid)
    assert u.status_code == 200 and u.json()["turns"] == 1


def test_restarted_node_registers_again_and_gets_traffic(cluster, killed):
    c = cluster
    port, old_id = killed["victim"], killed["ids"][killed["victim"]]
    c.decodes[port] = start_process(c.decode_cmd(port), DECODE_READY, 240)
    restarted = c.decodes[port]

    def back():
        e = decode_entry(c, port)
        return e if e and e["registered"] and e["healthy"] and e["node_id"] != old_id else None

    entry = wait_for(back, 30, "the restarted node to register")
    assert node_up(c, entry["node_id"]) == 1.0
    assert old_id not in {n["node_id"] for n in router_nodes(c)}
    rc = client(f"http://127.0.0.1:{c.http_port}/v1")
    for i, messages in enumerate(single_prompts("Comeback", 6)):
        sid = f"sess-comeback-{i}"
        ask(rc, messages, sid)
        if usage_on(restarted, sid).status_code == 200:
            break
    else:
        pytest.fail("no new session reached the restarted node")
    assert total(metrics(restarted), "vllm:request_success_total") >= 1
