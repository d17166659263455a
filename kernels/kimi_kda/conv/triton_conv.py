"""Triton short causal conv (depthwise conv1d + SiLU) for GPUs, with conv-state slots.

Same layouts and meaning as `causal_conv1d.py` (the PyTorch path), but no host synchronisation:
sequence bounds, slots and initial-state flags are read on the device, so both operators can be
captured in a CUDA graph and replayed for any batch of the captured size.

- prefill: one program per (block of tokens, block of channels); each token finds its sequence
  through `seq_of_token`, reads earlier inputs of its own sequence from `x` and the ones before
  the sequence's start from its slot (or zeros when the sequence has no initial state). A second
  launch then writes each slot's last width-1 inputs (after the first has read the old ones).
- update: one token per sequence; reads the slot's window, writes the shifted window back.
A negative slot is a padded entry: output zero, no slot touched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rows import token_rows


@triton.jit
def _act(y, SILU: tl.constexpr):
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


# What changes with every batch (the token count; views of per-step index arrays, whose alignment
# varies): unspecialised, so the profile run's one compile serves all (see triton_chunk).
@triton.jit(do_not_specialize=("T", "cu", "seq_of_token", "slots", "has_init"))
def _prefill_kernel(x, w, out, cu, seq_of_token, states, slots, has_init, T, D,
                    sx, so, ss0, ss1, ss2,
                    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                    HAS_STATE: tl.constexpr, SILU: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    mt, md = t < T, d < D
    n = tl.load(seq_of_token + t, mask=mt, other=0)
    bos = tl.load(cu + n, mask=mt, other=0)
    if HAS_STATE:
        slot = tl.load(slots + n, mask=mt, other=-1).to(tl.int64)
        init = tl.load(has_init + n, mask=mt, other=0)
        from_state_ok = mt & (slot >= 0) & (init != 0)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        src = t - (W - 1) + j
        in_seq = src >= bos
        xv = tl.load(x + src.to(tl.int64)[:, None] * sx + d[None, :],
                     mask=(mt & in_seq)[:, None] & md[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            col = (W - 1) - (bos - src)  # the slot holds the W-1 inputs before bos, oldest first
            sv = tl.load(states + slot[:, None] * ss0 + d[None, :] * ss1 + col[:, None] * ss2,
                         mask=(from_state_ok & ~in_seq)[:, None] & md[None, :], other=0.0)
            xv += sv.to(tl.float32)
        wj = tl.load(w + d * W + j, mask=md, other=0.0).to(tl.float32)
        acc += xv * wj[None, :]
    tl.store(out + t.to(tl.int64)[:, None] * so + d[None, :],
             _act(acc, SILU).to(out.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit(do_not_specialize=("cu", "slots", "has_init"))
def _save_state_kernel(x, cu, states, slots, has_init, D, sx, ss0, ss1, ss2,
                       W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    slot = tl.load(slots + n).to(tl.int64)
    if slot < 0:
        return
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    init = tl.load(has_init + n).to(tl.int32)
    c = tl.arange(0, BW)
    mc = c < W - 1
    p = eos - (W - 1) + c  # the input that lands in column c of the new state
    from_x = p >= bos
    xv = tl.load(x + p.to(tl.int64)[None, :] * sx + d[:, None],
                 mask=md[:, None] & (mc & from_x)[None, :], other=0.0)
    old_col = (W - 1) - (bos - p)
    base = states + slot * ss0 + d[:, None] * ss1
    # old columns only where the sequence has an initial state (init is 0 or 1)
    from_old = mc & (p < bos) & (p >= bos - (W - 1) * init)
    sv = tl.load(base + old_col[None, :] * ss2, mask=md[:, None] & from_old[None, :], other=0.0)
    new = tl.where(from_x[None, :], xv.to(states.dtype.element_ty), sv)
    tl.store(base + c[None, :] * ss2, new, mask=md[:, None] & mc[None, :])


@triton.jit
def _update_kernel(x, w, out, states, slots, D, sx, so, ss0, ss1, ss2,
                   W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr):
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    slot = tl.load(slots + n).to(tl.int64)
    if slot < 0:
        tl.store(out + n * so + d, tl.zeros([BD], dtype=out.dtype.element_ty), mask=md)
        return
    c = tl.arange(0, BW)
    mc = c < W - 1
    base = states + slot * ss0 + d[:, None] * ss1
    old = tl.load(base + c[None, :] * ss2, mask=md[:, None] & mc[None, :], other=0.0)
    # the window shifted by one: old columns 1..W-2, then the new token
    nxt = tl.load(base + (c + 1)[None, :] * ss2, mask=md[:, None] & (c + 1 < W - 1)[None, :], other=0.0)
    xn = tl.load(x + n * sx + d, mask=md, other=0.0)
    w_old = tl.load(w + d[:, None] * W + c[None, :], mask=md[:, None] & mc[None, :], other=0.0)
    w_new = tl.load(w + d * W + (W - 1), mask=md, other=0.0).to(tl.float32)
    acc = tl.sum(old.to(tl.float32) * w_old.to(tl.float32), 1) + xn.to(tl.float32) * w_new
    tl.store(out + n * so + d, _act(acc, SILU).to(out.dtype.element_ty), mask=md)
    new = tl.where((c == W - 2)[None, :], xn[:, None].to(states.dtype.element_ty), nxt)
    tl.store(base + c[None, :] * ss2, new, mask=md[:, None] & mc[None, :])


def _silu(activation) -> bool:
    if activation in ("silu", "swish"):
        return True
    if activation is None:
        return False
    raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def causal_conv1d_triton(x, weight, cu_seqlens=None, conv_states=None, state_indices=None,
                         has_initial_state=None, activation="silu", seq_of_token=None):
    """Prefill (see causal_conv1d.causal_conv1d). `seq_of_token` [T] (sequence of each token)
    may be passed precomputed; otherwise it is derived on the device from `cu_seqlens`."""
    T, D = x.shape
    W = weight.shape[1]
    x = token_rows(x, T)
    weight = weight.contiguous()
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=x.device)
    if seq_of_token is None:
        pos = torch.arange(T, device=x.device, dtype=cu_seqlens.dtype)
        seq_of_token = torch.searchsorted(cu_seqlens[1:], pos, right=True)
    n = cu_seqlens.numel() - 1
    out = x.new_empty(T, D)
    has_state = conv_states is not None
    if has_state:
        if has_initial_state is None:
            has_initial_state = torch.zeros(n, dtype=torch.int32, device=x.device)
        elif has_initial_state.dtype == torch.bool:
            has_initial_state = has_initial_state.to(torch.int32)  # bool masks trip the interpreter
        strides = conv_states.stride()
    else:
        strides = (0, 0, 0)
    BT, BD = 32, min(128, triton.next_power_of_2(D))
    if T:
        _prefill_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
            x, weight, out, cu_seqlens, seq_of_token, conv_states, state_indices, has_initial_state,
            T, D, x.stride(0), out.stride(0), *strides, W=W, BT=BT, BD=BD, HAS_STATE=has_state,
            SILU=_silu(activation))
    if has_state and n:
        _save_state_kernel[(n, triton.cdiv(D, BD))](
            x, cu_seqlens, conv_states, state_indices, has_initial_state, D, x.stride(0), *strides,
            W=W, BW=triton.next_power_of_2(max(W - 1, 1)), BD=BD)
    return out


def causal_conv1d_update_triton(x, weight, conv_states, state_indices, activation="silu"):
    """Decode (see causal_conv1d.causal_conv1d_update)."""
    N, D = x.shape
    W = weight.shape[1]
    x = token_rows(x, N)
    out = x.new_empty(N, D)
    if N:
        BD = min(128, triton.next_power_of_2(D))
        _update_kernel[(N, triton.cdiv(D, BD))](
            x, weight.contiguous(), out, conv_states, state_indices, D, x.stride(0), out.stride(0),
            *conv_states.stride(),
            W=W, BW=triton.next_power_of_2(max(W - 1, 1)), BD=BD, SILU=_silu(activation))
    return out
