"""Argument checks and the varlen chunk layout shared by every KDA backend.

Every public operator calls `check_kda_args` first, so a wrong shape is one clear `ValueError`
at the boundary instead of a broadcast error (or silent garbage) deep inside a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def output_buffer(out, shape, like):
    """Where an operator's output goes: the caller's `out`, checked to be a tensor of `like`'s
    dtype and of `shape`, or a new one."""
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, ssm_state_indices=None, *,
                   A_log=None, dt_bias=None, use_gate_in_kernel=False):
    """Validate shapes; return (B, T, H, K, V, N) where N is the number of sequences.

    With `use_gate_in_kernel`, g is the raw gate projection f and A_log (H elements) and the
    optional dt_bias (H*K elements) are the gate's parameters; they are refused otherwise, so
    a gate that would silently not be applied is an error."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    expected = {"k": (k, (B, T, H, K)), "v": (v, (B, T, H, V)), "g": (g, (B, T, H, K)),
                "beta": (beta, (B, T, H))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match q {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along T: B must be 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be 1-D [N + 1] cumulative lengths starting at 0")
        N = cu_seqlens.numel() - 1
        # value checks on host tensors only: on a GPU they would cost a sync on every step
        if cu_seqlens.device.type == "cpu":
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={T}, got {cu}")
    else:
        N = B
    if ssm_state_indices is not None:
        if initial_state is None:
            raise ValueError("ssm_state_indices names rows of a state pool: pass the pool as initial_state")
        if tuple(ssm_state_indices.shape) != (N,):
            raise ValueError(f"ssm_state_indices must be [N]={N} (one slot per sequence), "
                             f"got {tuple(ssm_state_indices.shape)}")
        if initial_state.dim() != 4 or tuple(initial_state.shape[1:]) != (H, K, V):
            raise ValueError(f"the state pool must be [num_slots, {H}, {K}, {V}], "
                             f"got {tuple(initial_state.shape)}")
        # bound check on host tensors only: on a GPU it would cost a sync on every decode step
        if (ssm_state_indices.device.type == "cpu" and ssm_state_indices.numel()
                and int(ssm_state_indices.max()) >= initial_state.shape[0]):
            raise ValueError(f"ssm_state_indices has slot {int(ssm_state_indices.max())} but the pool "
                             f"has {initial_state.shape[0]} slots")
    elif initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    check_gate_args(A_log, dt_bias, use_gate_in_kernel, H, K)
    if initial_state is not None and initial_state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"recurrent states are kept in float32, got {initial_state.dtype}: "
                         "pass initial_state.float()")
    return B, T, H, K, V, N


def check_gate_args(A_log, dt_bias, use_gate_in_kernel, H, K):
    """Shapes of the in-kernel gate's parameters (fla's layout: A_log [H], dt_bias [H*K])."""
    if not use_gate_in_kernel:
        if A_log is not None or dt_bias is not None:
            raise ValueError("A_log / dt_bias are the in-kernel gate's parameters: pass "
                             "use_gate_in_kernel=True (g is then the raw gate projection), or drop them")
        return
    if A_log is None:
        raise ValueError(f"use_gate_in_kernel=True needs A_log: one value per head, [H] = [{H}]")
    if A_log.numel() != H:
        raise ValueError(f"A_log must have H={H} elements (one per head), got shape {tuple(A_log.shape)}")
    if dt_bias is not None and dt_bias.numel() != H * K:
        raise ValueError(f"dt_bias must have H*K = {H}*{K} = {H * K} elements ([H*K] or [H, K]), "
                         f"got shape {tuple(dt_bias.shape)}")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def seq_bounds(B: int, T: int, cu_seqlens) -> list[tuple[int, int]]:
    """(start, end) of each sequence in the flattened [B*T] token axis."""
    if cu_seqlens is None:
        return [(b * T, (b + 1) * T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def chunk_layout_host(bounds: list[tuple[int, int]], chunk: int = 64) -> tuple[list[int], ...]:
    """The Triton chunk kernels' index of a packed batch, as host lists: (chunk start token,
    chunk end = its sequence's end, each sequence's first chunk [N + 1], sequence bounds [N + 1]),
    from each sequence's (start, end) token. 64 is the Triton kernels' chunk (triton_chunk.BT)."""
    starts, ends, first, cu = [], [], [0], [0]
    for s, e in bounds:
        for c in range(s, e, chunk):
            starts.append(c)
            ends.append(e)
        first.append(len(starts))
        cu.append(e)
    return starts, ends, first, cu


@dataclass
class ChunkLayout:
    """Where each token of a packed batch sits once every sequence is cut into chunks of C.

    Sequences are padded at their end to a multiple of C; padded positions read a zero row, and
    a zero token (k = v = g = beta = 0) leaves the state unchanged, so padding is exact.
    """
    C: int
    aligned: bool               # every sequence a multiple of C long: gather/scatter are views
    token_index: torch.Tensor   # [NC, C] row of the flattened input, or total_tokens for padding
    valid: torch.Tensor         # [NC, C] bool
    seq_chunks: list[list[int]]  # chunk ids of each sequence, in order

    @classmethod
    def build(cls, bounds: list[tuple[int, int]], C: int, total_tokens: int, device) -> "ChunkLayout":
        starts, seq_chunks, nc = [], [], 0
        for s, e in bounds:
            n = (e - s + C - 1) // C
            seq_chunks.append(list(range(nc, nc + n)))
            starts += [(s + j * C, e) for j in range(n)]
            nc += n
        start = torch.tensor([a for a, _ in starts], dtype=torch.long).view(-1, 1)
        end = torch.tensor([b for _, b in starts], dtype=torch.long).view(-1, 1)
        tok = start + torch.arange(C).view(1, -1)
        valid = tok < end
        tok = torch.where(valid, tok, torch.full_like(tok, total_tokens))
        aligned = bool(valid.all())
        return cls(C, aligned, tok.to(device), valid.to(device), seq_chunks)

    def gather(self, x_flat: torch.Tensor) -> torch.Tensor:
        """[total, ...] -> [NC, C, ...], zero where padded."""
        if self.aligned:
            return x_flat.unflatten(0, (-1, self.C))
        pad = x_flat.new_zeros((1, *x_flat.shape[1:]))
        return torch.cat([x_flat, pad])[self.token_index]

    def scatter(self, x_chunks: torch.Tensor, total_tokens: int) -> torch.Tensor:
        """[NC, C, ...] -> [total, ...], dropping padded positions."""
        if self.aligned:
            return x_chunks.flatten(0, 1)
        out = x_chunks.new_empty((total_tokens + 1, *x_chunks.shape[2:]))
        out[self.token_index.reshape(-1)] = x_chunks.reshape(-1, *x_chunks.shape[2:])
        return out[:total_tokens]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm: x / sqrt(sum(x^2) + eps) over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
