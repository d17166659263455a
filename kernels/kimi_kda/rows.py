"""How every Triton launch here reads a tensor of tokens: as [rows, the rest] with each row
contiguous and the row stride free. The layers' inputs are column blocks of one packed projection
(q|k|v of the conv output, beta of the input GEMM's output), so they are read in place, not copied."""
from __future__ import annotations

import torch


def token_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [rows, ...] (leading dims merged into `rows`) as a 2-D view whose rows are contiguous when
    x's are, a contiguous copy otherwise. Launches pass `.stride(0)` as the token stride."""
    y = x.reshape(rows, -1) if x.numel() else x.reshape(rows, 0)
    return y if y.shape[1] <= 1 or y.stride(1) == 1 else y.contiguous()
