"""The KDA short convolution: causal depthwise conv1d + SiLU over packed tokens, with conv-state slots.

Layouts: x [total_tokens, dim] (sequences packed, `cu_seqlens` [N + 1]); weight [dim, width];
conv-state pool [num_slots, dim, width - 1] holding each request's last width-1 inputs, oldest
first (any strides: a transposed view of a [num_slots, width - 1, dim] buffer works too).
A negative slot index marks a padded entry: it is skipped and no slot is touched.
Plain PyTorch, the CPU path: it reads sequence bounds on the host, so on a GPU use the Triton
kernels (`triton_conv.py`), which `kimi_kda.conv` picks there. Arguments are checked there too
(`check_conv_args`), once, before either path runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_conv_args(x, weight, conv_states, state_indices, n):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"x must be [tokens, dim] and weight [dim, width]; got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if conv_states is not None:
        want = (weight.shape[0], weight.shape[1] - 1)
        if conv_states.dim() != 3 or tuple(conv_states.shape[1:]) != want:
            raise ValueError(f"conv states must be [num_slots, {want[0]}, {want[1]}], "
                             f"got {tuple(conv_states.shape)}")
        if state_indices is None or state_indices.numel() != n:
            raise ValueError(f"state_indices must name one conv-state slot for each of the {n} sequences")
        # bound check on host tensors only: on a GPU it would cost a sync on every step
        if n and state_indices.device.type == "cpu" and int(state_indices.max()) >= conv_states.shape[0]:
            raise ValueError(f"state index {int(state_indices.max())} is past the "
                             f"{conv_states.shape[0]} conv-state slots")


def _act(y, activation):
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def causal_conv1d_torch(x, weight, cu_seqlens=None, conv_states=None, state_indices=None,
                  has_initial_state=None, activation="silu"):
    """Prefill. Each sequence starts from its slot's saved inputs where `has_initial_state[n]`
    (else zeros), and its slot is overwritten with its last width-1 inputs."""
    T = x.shape[0]
    cu = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    n = len(cu) - 1
    W = weight.shape[1]
    slots = state_indices.tolist() if state_indices is not None else [-1] * n
    init = has_initial_state.tolist() if has_initial_state is not None else [False] * n
    out = torch.empty_like(x)
    w = weight.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        xi = x[s:e].to(w.dtype)
        if slots[i] >= 0 and init[i]:
            prefix = conv_states[slots[i]].transpose(0, 1).to(w.dtype)      # [W-1, dim]
        else:
            prefix = xi.new_zeros(W - 1, x.shape[1])
        xp = torch.cat([prefix, xi])                                        # [W-1+L, dim]
        if e > s:
            y = (xp.unfold(0, W, 1) * w).sum(-1)                            # [L, dim]
            out[s:e] = _act(y, activation).to(x.dtype)
        if slots[i] >= 0:
            conv_states[slots[i]] = xp[xp.shape[0] - (W - 1):].transpose(0, 1).to(conv_states.dtype)
    return out


def causal_conv1d_update_torch(x, weight, conv_states, state_indices, activation="silu"):
    """Decode: one new token per sequence, x [N, dim]; slots updated in place, padded ones skipped."""
    out = torch.zeros_like(x)
    live = (state_indices >= 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    slots = state_indices[live].long()
    w = weight.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
    window = torch.cat([conv_states[slots].to(w.dtype), x[live].to(w.dtype).unsqueeze(-1)], dim=-1)
    out[live] = _act((window * w).sum(-1), activation).to(x.dtype)
    conv_states[slots] = window[..., 1:].to(conv_states.dtype)
    return out
