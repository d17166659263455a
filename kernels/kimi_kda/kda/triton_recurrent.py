"""Triton KDA recurrence: token-by-token decode (and short prefills), on a state pool or not.

One program owns one (sequence, head, V-block) tile of the state in registers for the whole
sequence: the state is read once and written once, which is the bandwidth floor for decode.
With a pool, the program reads and writes the pool row its slot index names, in place; a negative
index (a padded batch entry) writes zero outputs and leaves the pool alone.

Inputs are read, and the output written, through a token stride: the layer's q/k/v are views of
its conv output and beta of its input GEMM's output, and the output can be the layer's own buffer,
so a decode step makes no copies around the kernel (each a launch of its own in a decode step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rows import token_rows
from .args import check_kda_args, output_buffer
from .triton_chunk import _softplus


@triton.jit
def _recurrent_kda_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, slot_indices, A_log, dt_bias,
    scale, T, stride_pool_slot, sq, sk, sv, sg, sb, so,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_POOL: tl.constexpr,
    L2NORM: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    state_off = i_h * K * V + o_k[:, None] * V + o_v[None, :]

    if USE_POOL:
        slot = tl.load(slot_indices + i_n).to(tl.int64)
        if slot < 0:
            for t in range(bos, eos):
                tl.store(o + t * so + i_h * V + o_v, tl.zeros([BV], dtype=o.dtype.element_ty), mask=mask_v)
            return
        p_state = h0 + slot * stride_pool_slot + state_off
        b_h = tl.load(p_state, mask=mask_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            b_h += tl.load(h0 + i_n.to(tl.int64) * H * K * V + state_off, mask=mask_h, other=0.0).to(tl.float32)

    if GATE:  # g is the raw gate projection: g = -exp(A_log) softplus(f + dt_bias), per step below
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_bias = tl.zeros([BK], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + t * sq + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + t * sk + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + t * sg + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * sv + i_h * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * sb + i_h).to(tl.float32)
        if GATE:
            b_g = -b_a * _softplus(b_g + b_bias)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h *= tl.exp(b_g)[:, None]
        b_vn = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_beta
        b_h += b_k[:, None] * b_vn[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
        tl.store(o + t * so + i_h * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)

    if USE_POOL:
        tl.store(p_state, b_h.to(h0.dtype.element_ty), mask=mask_h)
    elif STORE_HT:
        tl.store(ht + i_n.to(tl.int64) * H * K * V + state_off, b_h.to(ht.dtype.element_ty), mask=mask_h)


SMALL_GRID = 512  # (sequence, head) pairs up to which the recurrent kernel takes BV=32


def fused_recurrent_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, ssm_state_indices=None,
                               *, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None,
                               dt_bias=None, out=None, block_v=None, num_warps=None):
    """`out` [B, T, H, V] (optional): written in place and returned, e.g. the layer's buffer;
    its [H, V] row of each token must be contiguous (the token stride is free)."""
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, ssm_state_indices,
                                      A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=use_gate_in_kernel)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (token_rows(x, B * T) for x in (q, k, v, g, beta))
    use_pool = ssm_state_indices is not None
    if use_pool and initial_state[0].stride() != (K * V, V, 1):
        raise ValueError("each row of the state pool must be a contiguous [H, K, V] block")
    if not use_pool and initial_state is not None:
        initial_state = initial_state.contiguous()
    out = output_buffer(out, (B, T, H, V), v)
    o = token_rows(out, B * T)
    if o.data_ptr() != out.data_ptr():  # a copy: the kernel would not write the caller's memory
        raise ValueError("each token's [H, V] row of out must be contiguous")
    a_log = A_log.reshape(-1).contiguous() if use_gate_in_kernel else g   # (g: an unread stand-in)
    bias = dt_bias.reshape(-1).contiguous() if dt_bias is not None else g
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if (output_final_state and not use_pool) else None
    BK = triton.next_power_of_2(K)
    # measured on an H200 (kernels/RESULTS.md, decode_layer_bench): with few (sequence, head)
    # programs BV=32 (more programs a head) is fastest, with many BV=64 reads+writes the pool
    # fastest; 2 warps for both. The crossover lies between 512 and 1,024 programs.
    BV = block_v or min(triton.next_power_of_2(V), 32 if N * H <= SMALL_GRID else 64)
    grid = (N * H, triton.cdiv(V, BV))
    _recurrent_kda_kernel[grid](
        q, k, v, g, beta, o, initial_state, ht, cu_seqlens, ssm_state_indices, a_log, bias,
        scale, T, initial_state.stride(0) if use_pool else 0,
        q.stride(0), k.stride(0), v.stride(0), g.stride(0), beta.stride(0), o.stride(0),
        H=H, K=K, V=V, BK=BK, BV=BV,
        HAS_H0=initial_state is not None, STORE_HT=ht is not None, IS_VARLEN=cu_seqlens is not None,
        USE_POOL=use_pool, L2NORM=use_qk_l2norm_in_kernel, GATE=use_gate_in_kernel,
        HAS_BIAS=dt_bias is not None, BETA_SIGMOID=use_beta_sigmoid_in_kernel,
        num_warps=num_warps or 2,
    )
    if use_pool:
        return out, initial_state
    return out, ht
