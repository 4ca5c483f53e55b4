"""Rotary position embedding (the "rotate half" layout used by HF checkpoints)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q/k laid out as [tokens, heads, head_dim] given absolute positions.

    With x = [x1, x2] (the two halves of head_dim), rotate-half RoPE is
    x * [cos, cos] + [x2, x1] * [-sin, sin]: one concatenation and a multiply-add per
    tensor, in float32. The layers of one forward share their positions, so the cos/sin
    rows gathered for them are kept while the positions stay the same.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        inv = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv.float())
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)   # [P, D]
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)  # [P, D], signed
        self._rows: tuple | None = None  # (a copy of the positions, cos rows, sin rows)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows
        # compared by value: a runner may refill one positions buffer in place every step
        if rows is None or rows[0].shape != positions.shape or not torch.equal(rows[0], positions):
            rows = self._rows = (positions.clone(), self.cos[positions].unsqueeze(1),
                                 self.sin[positions].unsqueeze(1))
        return rows[1], rows[2]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE of one [tokens, heads, head_dim] tensor (e.g. q and k side by side)."""
        cos, sin = self._cos_sin(positions)
        return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    half = x.shape[-1] // 2
    swapped = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return torch.addcmul(x32 * cos, swapped, sin).to(x.dtype)
