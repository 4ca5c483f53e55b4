"""What every loader returns: a config, a tokenizer and a one-pass stream of weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

# (HF parameter name, tensor) pairs, yielded one at a time so that loading never holds
# two full copies of the weights. Names follow transformers' checkpoints, e.g.
# "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight".
WeightStream = Iterator[tuple[str, torch.Tensor]]


@dataclass
class ModelSource:
    """A model ready to be built: config, tokenizer, and a factory for the weight stream."""

    config: ModelConfig
    tokenizer: Tokenizer
    open_weights: Callable[[], WeightStream]
    num_tensors: int
    description: str  # human-readable origin, e.g. the file path or hub id
    generation_config: dict[str, Any] = field(default_factory=dict)
    weight_format: str = "safetensors"  # or "gguf"
