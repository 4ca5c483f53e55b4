"""Qwen3: the Llama block with per-head RMSNorm on q and k before RoPE (config.qk_norm)."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
