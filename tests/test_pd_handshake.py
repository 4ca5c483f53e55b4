"""The PD handshake refuses a prefill node whose model or KV layout differ, and the decode
node then serves everything itself (colocated fallback) without ever moving KV.

Real processes: a prefill node serving a tiny random-weight Llama (a different model), a
prefill node serving the bundled model with a bfloat16 KV cache, and one float32 decode node
on the bundled model pointing at each. Direct gRPC Handshake calls check the reply itself.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from pd._generated import prefill_pb2 as pb
from pd._generated import prefill_pb2_grpc as pb_grpc
from pd.transport.fingerprint import PROTOCOL_VERSION
from server_utils import MODEL, free_port, metrics, start_process, sum_of
from tiny_models import build_tiny_model_dir

DECODE = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-gb", "0.3", "--log-level", "info"]
PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue during the day."}]


def log_text(proc) -> str:
    with proc._lock:
        return "".join(proc._stdout) + "".join(proc._stderr)


def start_prefill(*engine_args: str):
    port, http_port = free_port(), free_port()
    proc = start_process([sys.executable, "-m", "pd.prefill", "--port", str(port), "--http-port", str(http_port),
                          "--log-level", "info", *engine_args], "pd-prefill ready:", timeout=180)
    proc.grpc_address = f"127.0.0.1:{port}"
    return proc


def start_decode(prefill):
    return start_process([sys.executable, "-m", "pd.decode", "--port", str(free_port()), *DECODE,
                          "--pd-url", prefill.grpc_address, "--pd-min-prompt-tokens", "16",
                          "--pd-connect-timeout", "5"], "pd-decode ready:", timeout=180)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tiny_dir, _ = build_tiny_model_dir("llama", tmp_path_factory.mktemp("other-model"))
    started: dict = {}
    try:
        with ThreadPoolExecutor(2) as pool:
            futs = {"pf_other_model": pool.submit(start_prefill, "--w", str(tiny_dir), "--dtype", "float32",
                                                  "--max-model-len", "512", "--kv-cache-gb", "0.01"),
                    "pf_bf16": pool.submit(start_prefill, "--dtype", "bfloat16", "--max-model-len", "2048",
                                           "--kv-cache-gb", "0.1")}
            for name, f in futs.items():
                started[name] = f.result()
            futs = {"dec_other_model": pool.submit(start_decode, started["pf_other_model"]),
                    "dec_bf16": pool.submit(start_decode, started["pf_bf16"])}
            for name, f in futs.items():
                started[name] = f.result()
        yield started
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: p.stop(), started.values()))


def wait_for_log(proc, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (logs := log_text(proc)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log:\n{logs[-4000:]}")
        time.sleep(0.1)
    return logs


def assert_serves_locally(decode) -> None:
    r = httpx.post(decode.base_url + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": PROMPT, "max_tokens": 12, "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0
    assert body["usage"]["prompt_tokens"] >= 16  # long enough to have gone remote
    assert httpx.get(decode.base_url + "/health", timeout=10).status_code == 200
    m = metrics(decode.base_url)
    assert sum_of(m, "pdserve:kv_transfers_total") == 0
    assert sum_of(m, "pdserve:kv_transfer_bytes_total") == 0
    assert sum_of(m, "pdserve:kv_transfer_failures_total") == 0  # a refused peer is not a failed transfer
    assert sum_of(m, "pdserve:pd_local_prefills_total", cause="no_healthy") >= 1, log_text(decode)[-3000:]
    assert m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"]
    assert "transfer req-" not in log_text(decode)


# ---- decode node vs refusing prefill nodes ---------------------------------------------------------

def test_prefill_node_with_another_model_is_refused_and_decode_serves_locally(nodes):
    decode, prefill = nodes["dec_other_model"], nodes["pf_other_model"]
    logs = wait_for_log(decode, "handshake refused")
    line = next(ln for ln in logs.splitlines() if "handshake refused" in ln)
    assert prefill.grpc_address in line and "incompatible peer" in line, line
    assert "num_layers 2 vs 30" in line and "hidden_size" in line and "tokenizer_hash" in line, line
    assert "connected to prefill node" not in logs
    assert "refused handshake from decode-" in wait_for_log(prefill, "refused handshake")
    assert_serves_locally(decode)


def test_prefill_node_with_another_kv_dtype_is_refused_and_decode_serves_locally(nodes):
    decode, prefill = nodes["dec_bf16"], nodes["pf_bf16"]
    logs = wait_for_log(decode, "handshake refused")
    line = next(ln for ln in logs.splitlines() if "handshake refused" in ln)
    assert prefill.grpc_address in line and "incompatible peer" in line, line
    assert "KV dtype 'bfloat16' vs 'float32'" in line, line
    assert "num_layers" not in line  # same model: the dtype is the only difference named
    assert "connected to prefill node" not in logs
    assert_serves_locally(decode)


# ---- the Handshake RPC itself -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stubs(nodes):
    channels = {name: grpc.insecure_channel(nodes[name].grpc_address) for name in ("pf_bf16", "pf_other_model")}
    yield {name: pb_grpc.PrefillServiceStub(ch) for name, ch in channels.items()}
    for ch in channels.values():
        ch.close()


def handshake(stub, model=None, kv=None, version: int = PROTOCOL_VERSION, transports=("grpc",), host_id: str = "test-host"):
    return stub.Handshake(pb.HandshakeRequest(protocol_version=version, model=model, kv=kv,
                                              transports=list(transports), host_id=host_id,
                                              node_id="decode-test"), timeout=10)


@pytest.fixture(scope="module")
def bundled_identity(stubs):
    """The bundled model's fingerprint and bf16 KV spec, as the bf16 prefill node announces them."""
    reply = handshake(stubs["pf_bf16"])  # an empty fingerprint: refused, but the reply names the node's own
    assert not reply.accepted and "incompatible peer" in reply.reason
    assert reply.model.num_layers == 30 and reply.kv.dtype == "bfloat16" and reply.kv.block_size == 16
    return reply.model, reply.kv


def with_kv(kv: pb.KVSpec, **changes) -> pb.KVSpec:
    new = pb.KVSpec()
    new.CopyFrom(kv)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def test_handshake_accepts_an_identical_peer(stubs, bundled_identity):
    model, kv = bundled_identity
    reply = handshake(stubs["pf_bf16"], model, kv)
    assert reply.accepted and reply.reason == ""
    assert reply.transport == "grpc" and reply.protocol_version == PROTOCOL_VERSION and reply.max_model_len == 2048
    assert reply.node_id.startswith("prefill-")


def test_handshake_refuses_another_kv_dtype(stubs, bundled_identity):
    model, kv = bundled_identity
    reply = handshake(stubs["pf_bf16"], model, with_kv(kv, dtype="float32"))
    assert not reply.accepted and reply.transport == ""
    assert reply.reason == "incompatible peer: KV dtype 'bfloat16' vs 'float32'"


def test_handshake_refuses_another_block_size_and_layout(stubs, bundled_identity):
    model, kv = bundled_identity
    reply = handshake(stubs["pf_bf16"], model, with_kv(kv, block_size=32, layout="layer,slot,kv,head,dim"))
    assert not reply.accepted
    assert "KV block_size 16 vs 32" in reply.reason and "KV layout" in reply.reason, reply.reason


def test_handshake_refuses_another_model(stubs, bundled_identity):
    model, _ = bundled_identity
    reply = handshake(stubs["pf_other_model"], model, pb.KVSpec(dtype="float32", block_size=16,
                                                                 layout="layer,kv,slot,head,dim"))
    assert not reply.accepted and reply.reason.startswith("incompatible peer: ")
    for field in ("num_layers 2 vs 30", "hidden_size 64 vs 576", "vocab_size", "tokenizer_hash"):
        assert field in reply.reason, reply.reason
    assert "KV dtype" not in reply.reason  # both float32


def test_handshake_refuses_another_protocol_version(stubs, bundled_identity):
    model, kv = bundled_identity
    reply = handshake(stubs["pf_bf16"], model, kv, version=PROTOCOL_VERSION - 1)  # an older peer
    assert not reply.accepted and "protocol version" in reply.reason, reply.reason


def test_handshake_refuses_local_transport_from_another_host(stubs, bundled_identity):
    model, kv = bundled_identity
    reply = handshake(stubs["pf_bf16"], model, kv, transports=("local",), host_id="some-other-host")
    assert not reply.accepted and "no common transport" in reply.reason, reply.reason
    assert not reply.HasField("local_pool") or reply.local_pool.name == ""
