"""The two-node demo in two network namespaces (docker/two_node_demo.py): the compose file's
node commands, a 1 Gbit/s shaped link, gRPC KV transfer between "machines".

Needs root and `ip netns`; skipped otherwise. One colocated pd-decode on the host (same flags,
no --pd-url) gives the reference outputs.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from server_utils import free_port, start_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))
import two_node_demo as tnd  # noqa: E402

pytestmark = pytest.mark.slow

OK, WHY = tnd.netns_available()
if not OK:
    pytest.skip(f"two-node namespace demo: {WHY}", allow_module_level=True)

ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-gb", "0.3", "--log-level", "info"]
DECODE_ARGS = ["--pd-min-prompt-tokens", "16"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def demo():
    with tnd.TwoNodeDemo(engine_args=ENGINE_ARGS, decode_args=DECODE_ARGS, ready_timeout=150) as d:
        yield d


def _colocated_argv(demo_argv: list[str], port: int) -> list[str]:
    """The demo's decode command without the PD flags, listening on the host's loopback."""
    out, skip = [], False
    for i, a in enumerate(demo_argv):
        if skip:
            skip = False
            continue
        if a in ("--host", "--port") or (a.startswith("--pd-") and "=" not in a):
            skip = True
            continue
        out.append(a)
    return out + ["--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(scope="module")
def reference(demo):
    """Greedy outputs of a colocated pd-decode with the same engine flags (memoized)."""
    argv = _colocated_argv(demo.argv["decode"], free_port())
    assert "--pd-url" not in argv and "--dtype" in argv
    node = start_process(argv, "pd-decode ready:", timeout=150)
    url = node.base_url
    cache: dict[tuple[str, int], str] = {}

    def get(content: str, max_tokens: int = MAX_TOKENS) -> str:
        key = (content, max_tokens)
        if key not in cache:
            cache[key] = _text(tnd.chat(url, content, max_tokens))
        return cache[key]

    yield get
    node.stop()


def _text(r: dict) -> str:
    return r["choices"][0]["message"]["content"]


def _grpc_transfers(demo) -> int:
    return sum(1 for t in demo.transfers() if t["transport"] == "grpc")


def _metric_transfers(demo) -> float:
    m = re.search(r'^pdserve:kv_transfers_total\{[^}]*transport="grpc"[^}]*\} (\S+)', demo.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def _wait_for(predicate, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_pd_across_namespaces_equals_colocated(demo, reference):
    # The two nodes really are on different "hosts" for the handshake: different network
    # namespaces (host_id includes it), although /dev/shm is shared here.
    ns = {n: os.readlink(f"/proc/{demo.node_pid(n)}/ns/net") for n in ("prefill", "decode")}
    assert ns["prefill"] != ns["decode"]
    assert "transport grpc" in demo.decode_logs()

    # The image's HEALTHCHECK (either role, no configuration) passes against both nodes.
    image_check = tnd.dockerfile_healthcheck()
    assert demo.run_healthcheck("prefill", tnd.PREFILL_NS, image_check) == 0
    assert demo.run_healthcheck("decode", tnd.DECODE_NS, image_check) == 0

    before = _grpc_transfers(demo)
    prompts = [tnd.long_prompt(100 + i, words) for i, words in enumerate((50, 200, 400))]
    for p in prompts:
        r = demo.chat(p, MAX_TOKENS)
        assert r["usage"]["prompt_tokens"] >= 100
        assert _text(r) == reference(p), f"PD output differs from colocated for a {len(p)}-char prompt"
    transfers = demo.transfers()[-len(prompts):]
    assert _grpc_transfers(demo) - before == len(prompts), demo.decode_logs()[-4000:]
    assert all(t["transport"] == "grpc" and t["tokens"] > 0 and t["mb"] > 0 for t in transfers)
    assert not demo.fallbacks(), demo.fallbacks()
    assert _metric_transfers(demo) >= len(prompts)


def test_link_cut_falls_back_then_resumes(demo, reference):
    a = tnd.long_prompt(200, 80)
    b = tnd.long_prompt(201, 80)
    # b's next turn: b was prefilled locally during the cut and never reached the prefill
    # node, so afterwards the decode node holds a prefix the prefill node lacks.
    b2 = b + "\nAlso list three of the colours that appear in it, and say which one comes first."
    for p in (a, b, b2):
        reference(p)                               # reference first: the cut stays short
    marked_down = demo.decode_logs().count("marked down")
    connects = demo.decode_logs().count("connected to prefill node")
    fallbacks_before = len(demo.fallbacks())

    demo.cut_link()
    try:
        # Right after the cut: the transfer times out (or the health check noticed first).
        assert _text(demo.chat(a, MAX_TOKENS)) == reference(a)
        # Once the health check has marked the node down: no attempt at all.
        assert _wait_for(lambda: demo.decode_logs().count("marked down") > marked_down, 15), \
            demo.decode_logs()[-4000:]
        assert _text(demo.chat(b, MAX_TOKENS)) == reference(b)
        fallbacks = demo.fallbacks()[fallbacks_before:]
        assert len(fallbacks) >= 2, demo.decode_logs()[-4000:]
        assert all("prefilling locally" in reason for _, reason in fallbacks)
    finally:
        demo.restore_link()

    # Health checks reconnect (with backoff) once the link is back.
    assert _wait_for(lambda: demo.decode_logs().count("connected to prefill node") > connects, 30), \
        demo.decode_logs()[-4000:]
    transfers, metric = _grpc_transfers(demo), _metric_transfers(demo)
    fallbacks_before = len(demo.fallbacks())
    r = demo.chat(b2, MAX_TOKENS)
    assert _text(r) == reference(b2)
    assert not demo.fallbacks()[fallbacks_before:], demo.fallbacks()[fallbacks_before:]
    assert _grpc_transfers(demo) == transfers + 1
    # Only the suffix the decode node lacked went remote.
    assert 0 < demo.transfers()[-1]["tokens"] < r["usage"]["prompt_tokens"]
    assert _metric_transfers(demo) == metric + 1


def test_transfer_throughput_over_shaped_link(demo):
    prompt = tnd.long_prompt(300, 1300)             # 1,976 tokens with the chat template
    before = len(demo.transfers())
    r = demo.chat(prompt, 4)
    assert r["usage"]["prompt_tokens"] >= 1900
    new = demo.transfers()[before:]
    assert new and new[-1]["transport"] == "grpc", demo.decode_logs()[-4000:]
    t = new[-1]
    raw = demo.measure_link_mb_s()
    print(f"\nKV transfer over the shaped link ({demo.shaping}): {t['tokens']} tokens, {t['mb']:.1f} MB in "
          f"{t['ms']:.0f} ms = {t['mb_s']:.1f} MB/s (includes the prefill compute it overlaps); "
          f"raw TCP on the same link {raw:.0f} MB/s; configured rate 1 Gbit/s = {tnd.LINK_RATE_MB_S:.0f} MB/s")
    assert t["mb_s"] > 0 and raw > 0

