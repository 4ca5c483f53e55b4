"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2); Qwen2/Qwen3 reuse it with flags."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, linear,
                                  pack_weight)
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

# checkpoint name fragment -> (fused module fragment, shard id)
_STACKED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.attention_bias, dtype)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, False, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        v = qkv[:, nq + nk:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:  # q and k side by side: one rotation for both
            qk = self.rotary.rotate(positions, qkv[:, :nq + nk].view(t, self.num_heads + self.num_kv_heads,
                                                                      self.head_dim))
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = self.q_norm(qkv[:, :nq].view(t, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, nq:nq + nk].view(t, self.num_kv_heads, self.head_dim))
            q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(cfg, rotary, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _freeze=True,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, positions, kv_cache, meta)
            if on_layer_done is not None:
                on_layer_done(i)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """forward() returns final normed hidden states [T, hidden]; compute_logits() the fp32 logits."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype))
        self._packed_head: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, on_layer_done)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight if self._packed_head is None else self._packed_head).float()

    def finalize(self) -> None:
        """After loading: packs the output projection (a copy when it is the embedding's)."""
        if self.lm_head is None:
            self._packed_head = pack_weight(self.model.embed_tokens.weight)
        else:
            packed = pack_weight(self.lm_head.weight)
            if packed is not None:
                self.lm_head.weight = nn.Parameter(packed, requires_grad=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors (HF names) into parameters; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = _stacked_target(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            param = params[target]
            module = self.get_submodule(target.rsplit(".", 1)[0])
            loader = getattr(module, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard)
            else:
                _copy_plain(param, tensor, name)
            loaded.add(target if shard is None else f"{target}:{shard}")
        return loaded

    def expected_weight_names(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                names.update(f"{name}:{s}" for s in "qkv")
            elif ".gate_up_proj." in name:
                names.update(f"{name}:{s}" for s in (0, 1))
            else:
                names.add(name)
        return names


def _stacked_target(name: str) -> tuple[str, object]:
    for frag, fused, shard in _STACKED:
        if f".{frag}." in name:
            return name.replace(f".{frag}.", f".{fused}."), shard
    return name, None


def _copy_plain(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.data.copy_(tensor)
