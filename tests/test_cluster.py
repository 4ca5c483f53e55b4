"""pd-cluster, the README's main command, as a user runs it: real processes on loopback.

It starts a prefill and a decode node, prints the OpenAI URL once both answer, serves a
long prompt through the prefill node (gRPC transport) with the official openai client, and
on SIGINT stops every node it started, also when it was started with SIGINT ignored (a job
started with & from a script inherits that).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from openai import OpenAI

from server_utils import MODEL, free_port, parse_metrics, start_process, sum_of, wait_for


def _children(pid: int) -> set[int]:
    """Processes whose parent is pid (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cluster_serves_remote_prefills_and_stops_every_node_on_sigint():
    decode_port, prefill_port = free_port(), free_port()
    cluster = start_process(
        [sys.executable, "-m", "pd.cluster", "--port", str(decode_port), "--prefill-port", str(prefill_port),
         "--transport", "grpc", "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gb", "0.2",
         "--threads", "1", "--pd-min-prompt-tokens", "16", "--log-level", "warning"],
        "pd-cluster ready:", timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert cluster.url == f"http://127.0.0.1:{decode_port}/v1", cluster.ready_line
        nodes = _children(cluster.proc.pid)
        assert len(nodes) == 2, cluster.logs()

        client = OpenAI(base_url=cluster.url, api_key="none")
        facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": facts + " Is 7 even or odd?"}])
        assert reply.choices[0].message.content and reply.usage.prompt_tokens > 300
        m = parse_metrics(httpx.get(f"http://127.0.0.1:{decode_port}/metrics", timeout=10).text)
        assert sum_of(m, "pdserve:kv_transfers_total", transport="grpc") >= 1, "the prompt was not prefilled remotely"
    finally:
        cluster.signal(signal.SIGINT)
        try:
            rc = cluster.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # whatever happened, nothing is left running
            for pid in _children(cluster.proc.pid) if rc is None else ():
                os.kill(pid, signal.SIGKILL)
            cluster.stop(5)
    assert rc == 0, f"pd-cluster did not stop on SIGINT\n{cluster.logs()}"
    wait_for(lambda: not any(_alive(pid) for pid in nodes), timeout=30, what="the nodes to exit")
