"""Short causal convolution used by KDA's q/k/v paths: one entry point per operator.

Backends: "torch" (causal_conv1d.py, any device, reads sequence bounds on the host) and
"triton" (triton_conv.py: CUDA, no host synchronisation, so CUDA-graph safe; CPU under
TRITON_INTERPRET=1 for tests). `backend=None` reads $KDA_CONV_BACKEND, else picks "triton" on
CUDA and "torch" elsewhere.
"""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from .causal_conv1d import check_conv_args, causal_conv1d_torch, causal_conv1d_update_torch

CONV_BACKENDS = ("torch", "triton")


def resolve_conv_backend(device: torch.device, backend: str | None = None) -> str:
    return resolve_backend(device, backend, "KDA_CONV_BACKEND", CONV_BACKENDS, "conv")


def causal_conv1d(x, weight, cu_seqlens=None, conv_states=None, state_indices=None,
                  has_initial_state=None, activation="silu", backend=None, seq_of_token=None):
    """Prefill over packed sequences x [T, dim] (`cu_seqlens` [N + 1]); weight [dim, width].
    Sequence n starts from slot state_indices[n] of `conv_states` [slots, dim, width-1] where
    has_initial_state[n] (else zeros); its slot then holds its last width-1 inputs.
    `seq_of_token` [T] (Triton backend): each token's sequence, if the caller already has it."""
    n = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    check_conv_args(x, weight, conv_states, state_indices, n)
    if resolve_conv_backend(x.device, backend) == "triton":
        from .triton_conv import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, cu_seqlens, conv_states, state_indices,
                                    has_initial_state, activation, seq_of_token)
    return causal_conv1d_torch(x, weight, cu_seqlens, conv_states, state_indices, has_initial_state,
                               activation)


def causal_conv1d_update(x, weight, conv_states, state_indices, activation="silu", backend=None):
    """Decode: one new token per sequence, x [N, dim]; slots updated in place; a negative slot
    is a padded entry (output 0, no slot touched)."""
    check_conv_args(x, weight, conv_states, state_indices, x.shape[0])
    if resolve_conv_backend(x.device, backend) == "triton":
        from .triton_conv import causal_conv1d_update_triton
        return causal_conv1d_update_triton(x, weight, conv_states, state_indices, activation)
    return causal_conv1d_update_torch(x, weight, conv_states, state_indices, activation)


__all__ = ["causal_conv1d", "causal_conv1d_update", "resolve_conv_backend", "CONV_BACKENDS"]
