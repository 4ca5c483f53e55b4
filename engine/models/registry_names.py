"""Architecture names (as in a Hugging Face config's `architectures`) that pdserve can run.

Kept free of model imports so loaders can validate a checkpoint without building anything.
"""
from __future__ import annotations

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
