"""Model classes keyed by HF architecture name and by GGUF `general.architecture`."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    arch = GGUF_ARCHITECTURES.get(architecture, architecture)
    try:
        return MODEL_CLASSES[arch]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES) + sorted(GGUF_ARCHITECTURES))
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {supported}") from None


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    with torch.device(device):
        model = model_class(cfg.architecture)(cfg, dtype)
    return model.eval()
