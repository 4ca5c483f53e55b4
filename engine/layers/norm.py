"""RMSNorm with float32 statistics, like the reference implementations."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # all in float32, in place on one float32 copy, rounded once at the end: on CPU in
        # bf16 ~8x faster than op-by-op bf16 math and 3x faster than F.rms_norm, and the
        # float32 numbers are the reference's
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(self.eps))
        out = x32 * scale if x32 is x else x32.mul_(scale)  # never write into the caller's tensor
        return out.mul_(self.weight.float()).to(x.dtype)
