"""Qwen2 / Qwen2.5: the Llama block with biases on q/k/v (set by the config)."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
