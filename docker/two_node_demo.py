#!/usr/bin/env python3
"""The docker-compose two-node demo without Docker: two Linux network namespaces.

    sudo python docker/two_node_demo.py [--keep-running] [-- EXTRA NODE FLAGS]

Creates the namespaces pd-prefill-ns and pd-decode-ns joined by a veth pair (10.213.7.1 and
10.213.7.2), shapes that link to 1 Gbit/s (netem if the kernel has it, else tbf), adds a second
veth from the host into pd-decode-ns (10.213.7.5 <-> 10.213.7.6) so the host can talk to the
decode node, then starts the prefill node and the decode node with the `command:` lists of
docker/docker-compose.yml (only the hostname `prefill` becomes 10.213.7.1, and the program
names become `python -m` of this interpreter), waits until both are ready and their compose
healthchecks pass, sends greedy chat requests from the host, and removes everything
(processes, namespaces, veths) on exit, also after errors or Ctrl-C.

Needs root (ip netns, ip link, tc) and PyYAML (installed with huggingface_hub, a dependency).
`TwoNodeDemo` is the context manager the tests use.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_commands  # noqa: E402
from compose_commands import (COMPOSE_FILE, DOCKERFILE, PROGRAM_MODULES, arg_value,  # noqa: E402,F401
                              compose_command, compose_healthcheck, dockerfile_healthcheck, load_compose,
                              local_argv, replace_hosts)


PREFILL_NS, DECODE_NS = "pd-prefill-ns", "pd-decode-ns"
# 10.213.7.0/24, split in two /30 links: prefill <-> decode (shaped), host <-> decode.
PREFILL_IP, DECODE_IP = "10.213.7.1", "10.213.7.2"
HOST_IP, DECODE_HOST_SIDE_IP = "10.213.7.5", "10.213.7.6"
PREFIX = 30
# veth names (<= 15 characters): the PD link's two ends, then the host link's two ends.
VETH_PREFILL, VETH_DECODE = "pd7-pre", "pd7-dec"
VETH_HOST, VETH_DECODE_HOST = "pd7-host", "pd7-dech"

LINK_RATE = "1gbit"
LINK_RATE_MB_S = 125.0                      # 1 Gbit/s in MB/s (10^6 bytes)
NETEM_SHAPE = ["netem", "delay", "1ms", "rate", LINK_RATE]
TBF_SHAPE = ["tbf", "rate", LINK_RATE, "burst", "256kb", "latency", "50ms"]

# The compose service names used as hostnames in the node commands.
SERVICE_HOSTS = {"prefill": PREFILL_IP}
def node_commands(compose_path: str | os.PathLike = COMPOSE_FILE,
                  hosts: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The compose file's node commands with the service hostnames mapped to namespace IPs."""
    return compose_commands.node_commands(compose_path, SERVICE_HOSTS if hosts is None else hosts)


READY_MARKERS = {"prefill": "pd-prefill ready:", "decode": "pd-decode ready:"}

TRANSFER_RE = re.compile(r"transfer (\S+): (\d+) tokens, ([\d.]+) MB, ([\d.]+) ms, ([\d.]+) MB/s, transport (\w+)")
FALLBACK_RE = re.compile(r"fallback (\S+): (.*)")


# ---- shell helpers ------------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def netns_available() -> tuple[bool, str]:
    """(True, "") if this process may create network namespaces, else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns / ip link / tc)"
    name = f"pd-probe-{os.getpid()}"
    try:
        p = sh("ip", "netns", "add", name, check=False)
    except FileNotFoundError:
        return False, "the `ip` command (iproute2) is not installed"
    if p.returncode != 0:
        return False, f"`ip netns add` failed: {p.stderr.strip()}"
    sh("ip", "netns", "del", name, check=False)
    return True, ""


# ---- a node process -------------------------------------------------------------------------
class NodeProcess:
    """A node started in a namespace; stdout and stderr are collected by reader threads."""

    def __init__(self, name: str, ns: str, argv: list[str], ready_marker: str, echo: bool = False):
        self.name, self.ns, self.argv, self.echo = name, ns, argv, echo
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.ready_marker = ready_marker
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # ip netns exec execs the command: the Popen pid is the node's own pid.
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)
        self.threads = [threading.Thread(target=self._read, args=(s,), daemon=True)
                        for s in (self.proc.stdout, self.proc.stderr)]
        for t in self.threads:
            t.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            with self.lock:
                self.lines.append(line)
            if self.echo:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()
            if self.ready_marker in line:
                self.ready.set()
        stream.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                for t in self.threads:
                    t.join(2)
                raise RuntimeError(f"{self.name} node exited with {self.proc.returncode} before ready:\n"
                                   f"{self.logs()[-6000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} node not ready after {timeout:.0f} s:\n{self.logs()[-6000:]}")

    def logs(self) -> str:
        with self.lock:
            return "".join(self.lines)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in self.threads:
            t.join(2)


# ---- the demo ------------------------------------------------------------------------------
class TwoNodeDemo:
    """Two namespaces, a shaped link, a prefill node and a decode node from the compose file.

    engine_args go to both nodes and decode_args to the decode node only; both are appended
    after the compose command (argparse: a repeated flag's last value wins), e.g. the tests'
    float32 / small-cache settings. Use as a context manager; everything is removed on exit.
    """

    def __init__(self, engine_args: list[str] | tuple[str, ...] = (), decode_args: list[str] | tuple[str, ...] = (),
                 compose_file: str | os.PathLike = COMPOSE_FILE, shape: bool = True, echo: bool = False,
                 ready_timeout: float = 180.0):
        self.compose_file = compose_file
        self.engine_args, self.decode_args = list(engine_args), list(decode_args)
        self.shape, self.echo, self.ready_timeout = shape, echo, ready_timeout
        self.compose = load_compose(compose_file)
        cmds = node_commands(compose_file)
        self.argv = {"prefill": local_argv(cmds["prefill"]) + self.engine_args,
                     "decode": local_argv(cmds["decode"]) + self.engine_args + self.decode_args}
        self.decode_port = int(arg_value(self.argv["decode"], "--port") or 8080)
        self.decode_url = f"http://{DECODE_HOST_SIDE_IP}:{self.decode_port}"
        self.shaping: str = "none"
        self.nodes: dict[str, NodeProcess] = {}
        self._created = False

    # -- lifecycle --
    def __enter__(self) -> "TwoNodeDemo":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        ok, why = netns_available()
        if not ok:
            raise RuntimeError(why)
        self._remove_network()          # leftovers of a run that was killed
        self._created = True
        self._create_network()
        self.nodes["prefill"] = NodeProcess("prefill", PREFILL_NS, self.argv["prefill"], READY_MARKERS["prefill"],
                                            self.echo)
        self.nodes["prefill"].wait_ready(self.ready_timeout)
        self.nodes["decode"] = NodeProcess("decode", DECODE_NS, self.argv["decode"], READY_MARKERS["decode"],
                                           self.echo)
        self.nodes["decode"].wait_ready(self.ready_timeout)
        for svc, ns in (("prefill", PREFILL_NS), ("decode", DECODE_NS)):
            rc = self.run_healthcheck(svc, ns)
            if rc != 0:
                raise RuntimeError(f"the compose healthcheck of {svc} failed (exit {rc})")

    def close(self) -> None:
        for name in ("decode", "prefill"):
            node = self.nodes.pop(name, None)
            if node is not None:
                node.stop()
        if self._created:
            self._remove_network()
            self._created = False

    # -- network --
    def _create_network(self) -> None:
        for ns in (PREFILL_NS, DECODE_NS):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # The PD link, prefill <-> decode.
        sh("ip", "link", "add", VETH_PREFILL, "netns", PREFILL_NS, "type", "veth", "peer", "name", VETH_DECODE,
           "netns", DECODE_NS)
        sh("ip", "-n", PREFILL_NS, "addr", "add", f"{PREFILL_IP}/{PREFIX}", "dev", VETH_PREFILL)
        sh("ip", "-n", DECODE_NS, "addr", "add", f"{DECODE_IP}/{PREFIX}", "dev", VETH_DECODE)
        # The host's way in to the decode node's OpenAI port.
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_DECODE_HOST, "netns", DECODE_NS)
        sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", VETH_HOST)
        sh("ip", "-n", DECODE_NS, "addr", "add", f"{DECODE_HOST_SIDE_IP}/{PREFIX}", "dev", VETH_DECODE_HOST)
        for ns, dev in ((PREFILL_NS, VETH_PREFILL), (DECODE_NS, VETH_DECODE), (DECODE_NS, VETH_DECODE_HOST)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "link", "set", VETH_HOST, "up")
        if self.shape:
            self.shaping = self._shape_link()
            print(f"two_node_demo: link {VETH_PREFILL} <-> {VETH_DECODE} shaped with {self.shaping}", flush=True)

    def _shape_link(self) -> str:
        """netem (delay + rate) where the kernel has it, else a tbf rate limit; both ends."""
        for spec in (NETEM_SHAPE, TBF_SHAPE):
            done = []
            for ns, dev in ((PREFILL_NS, VETH_PREFILL), (DECODE_NS, VETH_DECODE)):
                if in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", *spec, check=False).returncode == 0:
                    done.append((ns, dev))
            if len(done) == 2:
                return " ".join(spec)
            for ns, dev in done:
                in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if spec is NETEM_SHAPE:
                print("two_node_demo: netem qdisc unavailable in this kernel; using tbf", flush=True)
        raise RuntimeError("could not shape the link with netem or tbf")

    @staticmethod
    def _remove_network() -> None:
        # Deleting a namespace deletes the veth ends in it, and a veth end takes its peer along.
        for ns in (PREFILL_NS, DECODE_NS):
            sh("ip", "netns", "del", ns, check=False)
        if sh("ip", "link", "show", VETH_HOST, check=False).returncode == 0:
            sh("ip", "link", "del", VETH_HOST, check=False)

    def cut_link(self) -> None:
        """Takes the prefill node's end of the PD link down (the decode side sees no carrier;
        its packets to the prefill node are dropped, as with a pulled cable)."""
        sh("ip", "-n", PREFILL_NS, "link", "set", VETH_PREFILL, "down")

    def restore_link(self) -> None:
        sh("ip", "-n", PREFILL_NS, "link", "set", VETH_PREFILL, "up")

    # -- checks --
    def run_healthcheck(self, service: str, ns: str, argv: list[str] | None = None) -> int:
        """Runs a healthcheck command (default: the compose service's) inside namespace `ns`."""
        argv = argv or compose_healthcheck(self.compose, service)
        if argv[0] in ("python", "python3"):
            argv = [sys.executable, *argv[1:]]
        return in_ns(ns, *argv, check=False).returncode

    def node_pid(self, name: str) -> int:
        return self.nodes[name].proc.pid

    def decode_logs(self) -> str:
        return self.nodes["decode"].logs()

    def prefill_logs(self) -> str:
        return self.nodes["prefill"].logs()

    def transfers(self) -> list[dict]:
        """The decode node's transfer log lines, parsed."""
        return [{"request_id": m[1], "tokens": int(m[2]), "mb": float(m[3]), "ms": float(m[4]),
                 "mb_s": float(m[5]), "transport": m[6]} for m in TRANSFER_RE.finditer(self.decode_logs())]

    def fallbacks(self) -> list[tuple[str, str]]:
        return [(m[1], m[2]) for m in FALLBACK_RE.finditer(self.decode_logs())]

    def metrics(self) -> str:
        return http_get(self.decode_url, "/metrics")

    def chat(self, content: str, max_tokens: int = 32, timeout: float = 120.0) -> dict:
        return chat(self.decode_url, content, max_tokens, timeout)

    def measure_link_mb_s(self, nbytes: int = 32 << 20, port: int = 8999) -> float:
        """Raw TCP throughput prefill -> decode across the shaped link (MB/s), for comparison."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", DECODE_NS, sys.executable, "-c", _SINK_SERVER, DECODE_IP, str(port)],
            stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()                       # "listening"
            out = in_ns(PREFILL_NS, sys.executable, "-c", _SOURCE_CLIENT, DECODE_IP, str(port), str(nbytes))
            return float(out.stdout.strip())
        finally:
            server.wait(30)


_SINK_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept()
while c.recv(1 << 20):
    pass
c.close()
"""
_SOURCE_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
n = int(sys.argv[3]); buf = b"x" * (1 << 20); t0 = time.monotonic(); sent = 0
while sent < n:
    c.sendall(buf); sent += len(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); dt = time.monotonic() - t0
print(sent / 1e6 / dt)
"""


# ---- HTTP (stdlib only; no proxies) ----------------------------------------------------------
def _conn(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    m = re.match(r"http://([^/:]+):(\d+)(.*)", base_url)
    if not m:
        raise ValueError(f"not an http://HOST:PORT URL: {base_url}")
    return http.client.HTTPConnection(m[1], int(m[2]), timeout=timeout), m[3].rstrip("/")


def http_get(base_url: str, path: str, timeout: float = 10.0) -> str:
    conn, prefix = _conn(base_url, timeout)
    try:
        conn.request("GET", prefix + path)
        r = conn.getresponse()
        return r.read().decode()
    finally:
        conn.close()


def chat(base_url: str, content: str, max_tokens: int = 32, timeout: float = 120.0) -> dict:
    """One greedy chat completion; returns the parsed response (raises on HTTP errors)."""
    conn, prefix = _conn(base_url, timeout)
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0}
    try:
        conn.request("POST", prefix + "/v1/chat/completions", json.dumps(body),
                     {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read().decode()
        if r.status != 200:
            raise RuntimeError(f"chat request failed: HTTP {r.status}: {data[:500]}")
        return json.loads(data)
    finally:
        conn.close()


def long_prompt(seed: int, words: int) -> str:
    """A deterministic prompt of about `words` words (~1.3 tokens each), unique per seed from
    its first word, so neither node's prefix cache serves it."""
    colours = ["red", "green", "blue", "amber", "violet", "silver", "golden", "white"]
    things = ["lighthouse", "river", "market", "orchard", "bridge", "library", "harbour", "mill"]
    out = [f"Story {seed}:"]
    i = 0
    while len(out) < words:
        out += f"The {colours[(seed + i) % 8]} {things[(seed * 3 + i) % 8]} number {i} stood quietly.".split()
        i += 1
    return " ".join(out[:words]) + "\nSummarize the story above in one sentence."


# ---- command line ----------------------------------------------------------------------------
def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-words", type=int, default=1200, help="size of the long demo prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--keep-running", action="store_true", help="leave the nodes up until Ctrl-C")
    ap.add_argument("--echo", action="store_true", help="print the nodes' logs as they come")
    ap.add_argument("node_args", nargs="*", help="extra flags for both nodes (after --), e.g. -- --dtype float32")
    args = ap.parse_args(argv)
    ok, why = netns_available()
    if not ok:
        print(f"two_node_demo: {why}", file=sys.stderr)
        return 2
    # SIGTERM / SIGHUP -> the same clean-up path as Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    cmds = node_commands()
    print("two_node_demo: commands from", COMPOSE_FILE)
    for name, cmd in cmds.items():
        print(f"  {name}: {' '.join(cmd)}")
    try:
        with TwoNodeDemo(engine_args=args.node_args, echo=args.echo) as demo:
            print(f"two_node_demo: prefill node in {PREFILL_NS} ({PREFILL_IP}), decode node in {DECODE_NS} "
                  f"({DECODE_IP}; from this host {demo.decode_url}/v1)", flush=True)
            print(f"two_node_demo: raw TCP across the link: {demo.measure_link_mb_s():.0f} MB/s "
                  f"(configured {LINK_RATE_MB_S:.0f} MB/s)", flush=True)
            for i, content in enumerate(["What is the capital of France?", long_prompt(1, args.prompt_words)]):
                t0 = time.monotonic()
                r = demo.chat(content, args.max_tokens)
                text = r["choices"][0]["message"]["content"]
                print(f"\n[request {i + 1}] {r['usage']['prompt_tokens']} prompt tokens, "
                      f"{time.monotonic() - t0:.1f} s:\n{text}", flush=True)
            print()
            for t in demo.transfers():
                print(f"two_node_demo: transfer {t['request_id']}: {t['tokens']} tokens, {t['mb']:.1f} MB, "
                      f"{t['mb_s']:.1f} MB/s over {t['transport']} (link {LINK_RATE_MB_S:.0f} MB/s)")
            for rid, reason in demo.fallbacks():
                print(f"two_node_demo: fallback {rid}: {reason}")
            if args.keep_running:
                print(f"two_node_demo: serving on {demo.decode_url}/v1; Ctrl-C stops and cleans up", flush=True)
                while all(n.proc.poll() is None for n in demo.nodes.values()):
                    time.sleep(1)
    except KeyboardInterrupt:
        print("\ntwo_node_demo: interrupted; cleaned up", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"two_node_demo: {exc}", file=sys.stderr)
        return 1
    print("two_node_demo: done; namespaces, veths and processes removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
