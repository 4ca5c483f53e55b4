"""Run a server program as a real subprocess for end-to-end tests.

`start_process` launches a command, waits for the line the program prints once it listens
(its "ready marker"), and returns a handle with the base URL found on that line. Output is
collected by reader threads so a failing test can show the server's logs.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

_URL_RE = re.compile(r"https?://[^\s)]+")
_LOG_TAIL_CHARS = 20_000


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessStartError(RuntimeError):
    pass


@dataclass
class RunningProcess:
    """A started server: `url` is the first URL on its ready line (e.g. http://127.0.0.1:PORT/v1)."""

    proc: subprocess.Popen
    args: list[str]
    url: str = ""
    ready_line: str = ""
    _stdout: list[str] = field(default_factory=list)
    _stderr: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """The URL without a trailing /v1 (for /health, /metrics, /tokenize)."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    @property
    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        """Everything the process printed so far (stdout then stderr), tail-trimmed."""
        with self._lock:
            out, err = "".join(self._stdout), "".join(self._stderr)
        text = f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        return text if len(text) <= _LOG_TAIL_CHARS else "...\n" + text[-_LOG_TAIL_CHARS:]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.is_alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Waits for the process to exit and its output to be read; returns the exit code."""
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.is_alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    # ---- output readers ----
    def _read(self, stream, sink: list[str], marker: str | None) -> None:
        for line in iter(stream.readline, ""):
            with self._lock:
                sink.append(line)
            if marker is not None and not self._ready.is_set() and marker in line:
                self.ready_line = line.strip()
                m = _URL_RE.search(line)
                self.url = m.group(0) if m else ""
                self._ready.set()
        stream.close()


def start_process(args: list[str], ready_marker: str, timeout: float = 120.0,
                  env: dict[str, str] | None = None, preexec_fn=None) -> RunningProcess:
    """Starts `args`, waits up to `timeout` s for a stdout line containing `ready_marker`
    (preexec_fn runs in the child before the program, as in subprocess.Popen).

    Raises ProcessStartError (with the logs) if the process exits or times out first; the
    process is killed in that case.
    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, env=full_env, preexec_fn=preexec_fn)
    rp = RunningProcess(proc, list(args))
    rp._threads = [threading.Thread(target=rp._read, args=(proc.stdout, rp._stdout, ready_marker), daemon=True),
                   threading.Thread(target=rp._read, args=(proc.stderr, rp._stderr, None), daemon=True)]
    for t in rp._threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not rp._ready.wait(0.1):
        if proc.poll() is not None:
            rp.wait(5)
            raise ProcessStartError(f"{args[:4]}... exited with {proc.returncode} before ready\n{rp.logs()}")
        if time.monotonic() > deadline:
            rp.stop(5)
            raise ProcessStartError(f"{args[:4]}... not ready after {timeout:.0f} s\n{rp.logs()}")
    return rp


def decode_server_args(port: int, *extra: str) -> list[str]:
    """The pd-decode command line the tests use: small float32 engine, quiet logs."""
    return [sys.executable, "-m", "pd.decode", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "1024", "--kv-cache-gb", "0.25", "--max-num-seqs", "16",
            "--log-level", "warning", *extra]


DECODE_READY = "pd-decode ready:"
MODEL = "SmolLM2-135M-Instruct"


def start_decode_server(*extra: str, timeout: float = 120.0, env: dict[str, str] | None = None
                        ) -> RunningProcess:
    """Starts pd-decode on a free port with the test defaults plus `extra` flags."""
    return start_process(decode_server_args(free_port(), *extra), DECODE_READY, timeout, env)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} plus {"name": value} for the first sample
    of each name (enough for the single-model gauges and counters the tests read)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[key] = v
        out.setdefault(key.split("{", 1)[0], v)
    return out


def metrics(base_url: str) -> dict[str, float]:
    """A node's /metrics, parsed."""
    import httpx
    r = httpx.get(base_url + "/metrics", timeout=30)
    assert r.status_code == 200
    return parse_metrics(r.text)


def sum_of(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` that carry all these labels."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.startswith(name + "{") and all(w in k for w in want))


def wait_for(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.1):
    """Polls predicate until it returns something truthy (returned), or fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
