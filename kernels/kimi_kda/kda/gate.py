"""The KDA forget gate: per-channel log-decay from the low-rank gate projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None,
             output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g = -exp(A_log[h]) * softplus(f + dt_bias), in float32 (float64 for float64 f).

    f: [..., H, K] (or [..., H*K], reshaped by A_log's H elements); A_log: H elements;
    dt_bias: [H*K]. Returns [..., H, K], fla-core's `naive_kda_gate` layout.
    """
    H = A_log.numel()
    if f.shape[-1] % H and (f.dim() < 2 or f.shape[-2] != H):
        raise ValueError(f"f's last dim {f.shape[-1]} is not H*K for the H={H} heads of A_log")
    if f.dim() < 2 or f.shape[-2] != H:
        f = f.unflatten(-1, (H, -1))
    dt = torch.float64 if f.dtype == torch.float64 else torch.float32   # the compute dtype
    x = f.to(dt)
    if dt_bias is not None:
        if dt_bias.numel() != x.shape[-2] * x.shape[-1]:
            raise ValueError(f"dt_bias has {dt_bias.numel()} elements, expected H*K = {x.shape[-2] * x.shape[-1]}")
        x = x + dt_bias.to(dt).view(x.shape[-2:])
    return (-A_log.to(dt).view(H, 1).exp() * F.softplus(x)).to(output_dtype)
