"""What two nodes must agree on before KV moves between them, and where they run."""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

from engine.engine import LLMEngine

PROTOCOL_VERSION = 3
KV_LAYOUT = "layer,kv,slot,head,dim"


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tokenizer_hash: str


@dataclass(frozen=True)
class KVSpec:
    dtype: str
    block_size: int
    layout: str = KV_LAYOUT


def engine_fingerprint(llm: LLMEngine) -> Fingerprint:
    cfg = llm.config.model
    arch = {"MistralForCausalLM": "LlamaForCausalLM"}.get(cfg.architecture, cfg.architecture)
    return Fingerprint(arch, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size,
                       llm.tokenizer.fingerprint())


def engine_kv_spec(llm: LLMEngine) -> KVSpec:
    lay = llm.pool.layout
    return KVSpec(str(lay.dtype).replace("torch.", ""), lay.block_size)


def incompatibility(ours: Fingerprint, ours_kv: KVSpec, theirs: Fingerprint, theirs_kv: KVSpec,
                    their_version: int) -> str | None:
    """None when compatible, else one sentence naming every difference."""
    if their_version != PROTOCOL_VERSION:
        return f"protocol version differs: {their_version} vs {PROTOCOL_VERSION}"
    diffs = [f"{k} {v!r} vs {getattr(theirs, k)!r}" for k, v in asdict(ours).items() if getattr(theirs, k) != v]
    diffs += [f"KV {k} {v!r} vs {getattr(theirs_kv, k)!r}" for k, v in asdict(ours_kv).items()
              if getattr(theirs_kv, k) != v]
    if not diffs:
        return None
    return "incompatible peer: " + "; ".join(diffs)


def host_id() -> str:
    """Equal for two processes that can share POSIX shared memory: same boot, same IPC and
    network namespace (containers and network namespaces get different ids)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    for ns in ("ipc", "net", "mnt"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            pass
    return "|".join(parts)
