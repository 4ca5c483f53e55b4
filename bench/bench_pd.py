"""PD against colocated, on this machine, with pd-bench as the load generator.

    python bench/bench_pd.py [--input-len 2048] [--requests 5] [--json out.json]

Runs, one after another:
  colo-1core   pd-decode pinned to core 0, 1 thread (the prefill node's compute: isolates PD overhead)
  colo-2core   pd-decode pinned to cores 0-1, 2 threads (the same cores the PD pair gets in total)
  pd-<t>       pd-cluster --pin: prefill node on core 0, decode node on core 1, 1 thread each,
               for transport t in grpc and local
and measures for each (1) TTFT of --input-len prompts sent one at a time, and (2) p99
inter-token latency of running decodes (4 streams, short prompts, 128 output tokens) while
--input-len prompts keep arriving (one every --prefill-interval seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["--dtype", "bfloat16", "--max-model-len", "4096", "--kv-cache-gb", "0.5", "--log-level", "warning"]


def start(cmd: list[str], marker: str, cpus: set[int] | None, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                            start_new_session=True)
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            if marker in line:
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        stop(proc)
        raise RuntimeError(f"{cmd[:4]} not ready in {timeout} s")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def bench(url: str, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    subprocess.run([sys.executable, "-m", "pd.bench", "--base-url", url, "--no-progress", "--json", path] + args,
                   check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        data = json.load(f)
    os.unlink(path)
    return data["results"]


def measure(url: str, a: argparse.Namespace) -> dict:
    # warm-up (first requests pay one-time costs)
    bench(url, ["--dataset", "fixed", "--input-len", "256", "--output-len", "4", "--num-requests", "2",
                "--concurrency", "1", "--seed", "1"])
    ttft = bench(url, ["--dataset", "fixed", "--input-len", str(a.input_len), "--output-len", "2",
                       "--num-requests", str(a.requests), "--concurrency", "1", "--seed", "2"])
    result: dict = {}
    prefills = threading.Thread(target=lambda: result.setdefault("bg", bench(url, [
        "--dataset", "fixed", "--input-len", str(a.input_len), "--output-len", "1",
        "--num-requests", str(a.background), "--request-rate", str(1 / a.prefill_interval), "--seed", "3"])))
    prefills.start()
    decodes = bench(url, ["--dataset", "fixed", "--input-len", "64", "--output-len", "128",
                          "--num-requests", "4", "--concurrency", "4", "--seed", "4"])
    prefills.join()
    return {"ttft_ms_mean": ttft["ttft_ms"]["mean"], "ttft_ms_p50": ttft["ttft_ms"]["p50"],
            "itl_ms_p50": decodes["itl_ms"]["p50"], "itl_ms_p99": decodes["itl_ms"]["p99"],
            "decode_tok_s": decodes["output_throughput"]}


def run_config(name: str, a: argparse.Namespace) -> dict:
    py = sys.executable
    if name.startswith("colo"):
        cores = {0} if name == "colo-1core" else {0, 1}
        proc = start([py, "-m", "pd.decode", "--port", str(a.port), "--threads", str(len(cores))] + COMMON,
                     "pd-decode ready", cores)
    else:
        transport = name.split("-", 1)[1]
        proc = start([py, "-m", "pd.cluster", "--pin", "--port", str(a.port), "--prefill-port", str(a.port + 10),
                      "--transport", transport, "--pd-min-prompt-tokens", "256"] + COMMON, "pd-cluster ready", None)
    try:
        return measure(f"http://127.0.0.1:{a.port}", a)
    finally:
        stop(proc)
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--background", type=int, default=6, help="long prompts arriving during the ITL test")
    ap.add_argument("--prefill-interval", type=float, default=1.5)
    ap.add_argument("--port", type=int, default=8750)
    ap.add_argument("--configs", default="colo-1core,colo-2core,pd-grpc,pd-local")
    ap.add_argument("--json")
    a = ap.parse_args()
    results = {}
    for name in a.configs.split(","):
        results[name] = run_config(name, a)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"\nTTFT of {a.input_len}-token prompts (one at a time) and decode ITL under arriving long prefills")
    print(f"{'config':<12}{'TTFT mean ms':>14}{'TTFT p50 ms':>13}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'decode tok/s':>14}")
    for name, r in results.items():
        print(f"{name:<12}{r['ttft_ms_mean']:>14.1f}{r['ttft_ms_p50']:>13.1f}{r['itl_ms_p50']:>12.1f}"
              f"{r['itl_ms_p99']:>12.1f}{r['decode_tok_s']:>14.1f}")
    base = results.get("colo-1core")
    if base:
        for name, r in results.items():
            if name.startswith("pd"):
                print(f"{name}: TTFT overhead vs colo-1core {100 * (r['ttft_ms_mean'] / base['ttft_ms_mean'] - 1):+.1f}%"
                      f" (target <= 15%)")
    both = results.get("colo-2core")
    if both:
        for name, r in results.items():
            if name.startswith("pd"):
                print(f"{name}: p99 ITL {r['itl_ms_p99']:.1f} ms vs colo-2core {both['itl_ms_p99']:.1f} ms "
                      f"({both['itl_ms_p99'] / max(r['itl_ms_p99'], 1e-9):.2f}x lower)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
