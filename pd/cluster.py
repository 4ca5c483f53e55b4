"""pd-cluster: start a local prefill+decode cluster on loopback and serve the OpenAI API.

    pd-cluster                         # 1 prefill + 1 decode node, bundled model
    pd-cluster --prefill 2 --decode 1 --transport grpc --f model.gguf --dtype float32

Flags it does not know (model and engine flags) are passed to every node. Ctrl-C (or
SIGTERM) stops all of them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger("pd.cluster")


@dataclass
class Node:
    name: str
    cmd: list[str]
    marker: str
    cpus: set[int] | None = None
    proc: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def start(self, quiet: bool) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, preexec_fn=self._pin)
        threading.Thread(target=self._read, args=(quiet,), daemon=True).start()

    def _pin(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _read(self, quiet: bool) -> None:
        for line in self.proc.stdout:
            if self.marker in line and not self.ready.is_set():
                self.url = line.split(self.marker, 1)[1].split()[0]
                self.ready.set()
            if not quiet or "ERROR" in line or "WARNING" in line:
                sys.stderr.write(f"[{self.name}] {line}")

    def stop(self, timeout: float) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", type=int, default=1, help="number of prefill nodes")
    p.add_argument("--decode", type=int, default=1, help="number of decode nodes")
    p.add_argument("--transport", default="auto", choices=["auto", "grpc", "local"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="first decode node's HTTP port")
    p.add_argument("--prefill-port", type=int, default=8000, help="first prefill node's gRPC port")
    p.add_argument("--pin", action="store_true", help="pin each node to its own CPU core (round robin)")
    p.add_argument("--router", action="store_true", help="start a pd-router in front; nodes register with it")
    p.add_argument("--router-port", type=int, default=8888)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--verbose", action="store_true", help="show every node's log lines")
    return p


def split_decode_only(extra: list[str]) -> tuple[list[str], list[str]]:
    """(flags for every node, --pd-* flags and their values, which only decode nodes take)."""
    common, decode_only = [], []
    i = 0
    while i < len(extra):
        flag = extra[i]
        target = decode_only if flag.startswith("--pd-") else common
        target.append(flag)
        if flag.startswith("--") and "=" not in flag and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            target.append(extra[i + 1])
            i += 1
        i += 1
    return common, decode_only


def plan(args: argparse.Namespace, extra: list[str]) -> list[Node]:
    extra, decode_extra = split_decode_only(extra)
    cpus = sorted(os.sched_getaffinity(0))
    nodes: list[Node] = []
    prefill_addrs = []
    for i in range(args.prefill):
        port = args.prefill_port + 2 * i
        prefill_addrs.append(f"{args.host}:{port}")
        nodes.append(Node(f"prefill{i}", [sys.executable, "-m", "pd.prefill", "--host", args.host, "--port",
                                          str(port), "--http-port", str(port + 1)] + extra, "pd-prefill ready: "))
    for i in range(args.decode):
        cmd = [sys.executable, "-m", "pd.decode", "--host", args.host, "--port", str(args.port + i)]
        if prefill_addrs:
            cmd += ["--pd-url", ",".join(prefill_addrs), "--pd-transport", args.transport]
        nodes.append(Node(f"decode{i}", cmd + extra + decode_extra, "pd-decode ready: "))
    if args.router:
        events = f"{args.host}:{args.router_port + 1}"
        for node in nodes:
            node.cmd += ["--router-url", events]
        model_flags = _model_flags(extra)
        nodes.insert(0, Node("router", [sys.executable, "-m", "pd.router", "--host", args.host, "--port",
                                        str(args.router_port), "--grpc-port", str(args.router_port + 1),
                                        "--policy", args.policy] + model_flags, "pd-router ready: "))
    if args.pin:
        for i, node in enumerate(nodes):
            node.cpus = {cpus[i % len(cpus)]}
            node.cmd += ["--threads", "1"]
    return nodes


def _model_flags(extra: list[str]) -> list[str]:
    """The model flags among the pass-through flags (the router loads only the tokenizer)."""
    out, i = [], 0
    names = ("--m", "--model", "--w", "--weights-dir", "--f", "--gguf", "--revision")
    while i < len(extra):
        if extra[i] in names and i + 1 < len(extra):
            out += extra[i:i + 2]
            i += 2
        else:
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nodes = plan(args, extra)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # SIGINT stops the cluster even where it started ignored (a job started with & from a
    # script), as a server's handlers do
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        routers = [n for n in nodes if n.name == "router"]
        for n in routers:
            n.start(not args.verbose)
        _wait_ready(routers, args.startup_timeout)
        prefills = [n for n in nodes if n.name.startswith("prefill")]
        for n in prefills:  # prefill nodes first, so decode nodes find them at start-up
            n.start(not args.verbose)
        _wait_ready(prefills, args.startup_timeout)
        decodes = [n for n in nodes if n.name.startswith("decode")]
        for n in decodes:
            n.start(not args.verbose)
        _wait_ready(decodes, args.startup_timeout)
        for n in prefills:
            logger.info("%s: %s", n.name, n.url)
        urls = routers[0].url if routers else " ".join(n.url for n in decodes)
        print(f"pd-cluster ready: {urls} ({len(prefills)} prefill, {len(decodes)} decode, transport "
              f"{args.transport}{', router' if routers else ''})", flush=True)
        while not stop.is_set():
            dead = [n for n in nodes if n.proc.poll() is not None]
            if dead:
                logger.error("%s exited with code %d; stopping the cluster", dead[0].name, dead[0].proc.returncode)
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        for n in reversed(nodes):
            n.stop(15.0)
    return 0


def _wait_ready(nodes: list[Node], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for n in nodes:
        while not n.ready.wait(0.2):
            if n.proc.poll() is not None:
                raise RuntimeError(f"{n.name} exited with code {n.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n.name} was not ready after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
