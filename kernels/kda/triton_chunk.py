"""Triton chunked KDA prefill (forward only), in five launches over chunks of 64 tokens.

The algebra is the one in `kernels/kda/cpu.py` (UT transform, then a state pass):
  1. `_cumsum_kernel`  per chunk: gc = cumulative log-decay inside the chunk (fp32).
  2. `_intra_kernel`   per chunk: Aqk (s <= t) and beta*Akk (s < t) from 16x16 blocks. Off-diagonal
                       blocks are one dot each, both factors taken relative to the block row's first
                       token; diagonal blocks go column by column, exactly. Exponents are clamped at 0,
                       a no-op for valid entries (all <= 0) that keeps padded rows finite.
  3. `_solve_kernel`   per chunk: X = (I + beta*Akk)^-1 by forward substitution, w = X (beta e^gc k),
                       u = X (beta v).
  4. `_state_kernel`   per sequence and V-block, sequential over its chunks: stores the state
                       entering each chunk, v_new = u - w S, and S = e^gc_C S + kendᵀ v_new.
  5. `_output_kernel`  per chunk and V-block: o = (q e^gc) S + Aqk v_new.
Intermediates are fp32. Dots on fp32 inputs use exact fp32 ('ieee'); on bf16/fp16 inputs, tf32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .args import check_kda_args, l2norm, seq_bounds

BT = 64   # chunk
BC = 16   # sub-block


@triton.jit
def _cumsum_kernel(g, gc, chunk_start, chunk_end, H: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    rows = start + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m = (rows < end)[:, None] & (o_k < K)[None, :]
    off = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    tl.store(gc + off, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def _intra_kernel(q, k, gc, beta, Aqk, Akk, chunk_start, chunk_end, scale,
                  H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    o_k = tl.arange(0, BK)
    mk = o_k < K
    o_c = tl.arange(0, BC)
    a_base = (i_c * H + i_h).to(tl.int64) * BT * BT
    for i in tl.static_range(BT // BC):
        rows_i = start + i * BC + o_c
        mi = (rows_i < end)[:, None] & mk[None, :]
        off_i = (rows_i[:, None] * H + i_h) * K + o_k[None, :]
        b_qi = tl.load(q + off_i, mask=mi, other=0.0).to(tl.float32) * scale
        b_ki = tl.load(k + off_i, mask=mi, other=0.0).to(tl.float32)
        b_gi = tl.load(gc + off_i, mask=mi, other=0.0)
        b_beta = tl.load(beta + rows_i * H + i_h, mask=rows_i < end, other=0.0).to(tl.float32)
        # reference token: the first of block i
        b_g0 = tl.load(gc + ((start + i * BC) * H + i_h) * K + o_k, mask=mk, other=0.0)
        left = tl.exp(tl.minimum(b_gi - b_g0[None, :], 0.0))
        b_lq = b_qi * left
        b_lk = b_ki * left
        for j in tl.static_range(i):
            rows_j = start + j * BC + o_c
            mj = (rows_j < end)[:, None] & mk[None, :]
            off_j = (rows_j[:, None] * H + i_h) * K + o_k[None, :]
            b_kj = tl.load(k + off_j, mask=mj, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + off_j, mask=mj, other=0.0)
            b_rk = tl.trans(b_kj * tl.exp(tl.minimum(b_g0[None, :] - b_gj, 0.0)))
            a_off = a_base + (i * BC + o_c)[:, None] * BT + (j * BC + o_c)[None, :]
            tl.store(Aqk + a_off, tl.dot(b_lq, b_rk, input_precision=PREC))
            tl.store(Akk + a_off, tl.dot(b_lk, b_rk, input_precision=PREC) * b_beta[:, None])
        # diagonal block, one column at a time
        b_aq = tl.zeros([BC, BC], dtype=tl.float32)
        b_ak = tl.zeros([BC, BC], dtype=tl.float32)
        for c in range(BC):
            row_c = start + i * BC + c
            mc = mk & ((row_c + 0 * o_k) < end)
            b_kc = tl.load(k + (row_c * H + i_h) * K + o_k, mask=mc, other=0.0).to(tl.float32)
            b_gc = tl.load(gc + (row_c * H + i_h) * K + o_k, mask=mc, other=0.0)
            b_e = tl.exp(tl.minimum(b_gi - b_gc[None, :], 0.0)) * b_kc[None, :]
            vq = tl.sum(b_qi * b_e, 1)
            vk = tl.sum(b_ki * b_e, 1)
            sel = o_c[None, :] == c
            b_aq = tl.where(sel & (o_c[:, None] >= c), vq[:, None], b_aq)
            b_ak = tl.where(sel & (o_c[:, None] > c), vk[:, None], b_ak)
        a_off = a_base + (i * BC + o_c)[:, None] * BT + (i * BC + o_c)[None, :]
        tl.store(Aqk + a_off, b_aq)
        tl.store(Akk + a_off, b_ak * b_beta[:, None])
        # blocks above the diagonal are zero
        for j in tl.static_range(i + 1, BT // BC):
            a_off = a_base + (i * BC + o_c)[:, None] * BT + (j * BC + o_c)[None, :]
            tl.store(Aqk + a_off, tl.zeros([BC, BC], dtype=tl.float32))
            tl.store(Akk + a_off, tl.zeros([BC, BC], dtype=tl.float32))


@triton.jit
def _solve_kernel(k, v, gc, beta, Akk, w, u, chunk_start, chunk_end,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    a_base = (i_c * H + i_h).to(tl.int64) * BT * BT
    # forward substitution: row t of X = e_t - sum_{s<t} A[t, s] X[s]
    b_x = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for t in range(1, BT):
        b_a = tl.load(Akk + a_base + t * BT + o_t, mask=o_t < t, other=0.0)
        b_row = -tl.sum(b_a[:, None] * b_x, 0)
        b_row = tl.where(o_t == t, 1.0, b_row)
        b_x = tl.where(o_t[:, None] == t, b_row[None, :], b_x)
    rows = start + o_t
    mr = rows < end
    b_beta = tl.load(beta + rows * H + i_h, mask=mr, other=0.0).to(tl.float32)
    o_k = tl.arange(0, BK)
    mk = mr[:, None] & (o_k < K)[None, :]
    off_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_k = tl.load(k + off_k, mask=mk, other=0.0).to(tl.float32)
    b_g = tl.load(gc + off_k, mask=mk, other=0.0)
    b_kb = b_k * tl.exp(tl.minimum(b_g, 0.0)) * b_beta[:, None]
    tl.store(w + off_k, tl.dot(b_x, b_kb, input_precision=PREC), mask=mk)
    o_v = tl.arange(0, BV)
    mv = mr[:, None] & (o_v < V)[None, :]
    off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    b_v = tl.load(v + off_v, mask=mv, other=0.0).to(tl.float32) * b_beta[:, None]
    tl.store(u + off_v, tl.dot(b_x, b_v, input_precision=PREC), mask=mv)


@triton.jit
def _state_kernel(k, gc, w, u, v_new, h, h0, ht, seq_chunk_first, chunk_start, chunk_end,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  PREC: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c0 = tl.load(seq_chunk_first + i_n)
    c1 = tl.load(seq_chunk_first + i_n + 1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    mh = mk[:, None] & mv[None, :]
    state_off = i_h * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + i_n.to(tl.int64) * H * K * V + state_off, mask=mh, other=0.0).to(tl.float32)
    o_t = tl.arange(0, BT)
    for c in range(c0, c1):
        start = tl.load(chunk_start + c).to(tl.int64)
        end = tl.load(chunk_end + c).to(tl.int64)
        tl.store(h + tl.cast(c, tl.int64) * H * K * V + state_off, b_s, mask=mh)
        rows = start + o_t
        mr = rows < end
        mrk = mr[:, None] & mk[None, :]
        off_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        mrv = mr[:, None] & mv[None, :]
        b_w = tl.load(w + off_k, mask=mrk, other=0.0)
        b_vn = tl.load(u + off_v, mask=mrv, other=0.0) - tl.dot(b_w, b_s, input_precision=PREC)
        tl.store(v_new + off_v, b_vn, mask=mrv)
        last = tl.minimum(start + BT, end) - 1
        b_glast = tl.load(gc + (last * H + i_h) * K + o_k, mask=mk, other=0.0)
        b_g = tl.load(gc + off_k, mask=mrk, other=0.0)
        b_k = tl.load(k + off_k, mask=mrk, other=0.0).to(tl.float32)
        b_kend = b_k * tl.exp(tl.minimum(b_glast[None, :] - b_g, 0.0))
        b_s = b_s * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_kend), b_vn, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_n.to(tl.int64) * H * K * V + state_off, b_s, mask=mh)


@triton.jit
def _output_kernel(q, gc, h, Aqk, v_new, o, chunk_start, chunk_end, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    rows = start + o_t
    mr = rows < end
    mk = o_k < K
    mv = o_v < V
    off_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    mrk = mr[:, None] & mk[None, :]
    b_q = tl.load(q + off_k, mask=mrk, other=0.0).to(tl.float32) * scale
    b_g = tl.load(gc + off_k, mask=mrk, other=0.0)
    b_qd = b_q * tl.exp(tl.minimum(b_g, 0.0))
    b_h = tl.load(h + i_c.to(tl.int64) * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=mk[:, None] & mv[None, :], other=0.0)
    a_off = (i_c * H + i_h).to(tl.int64) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    b_a = tl.load(Aqk + a_off)
    off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    mrv = mr[:, None] & mv[None, :]
    b_vn = tl.load(v_new + off_v, mask=mrv, other=0.0)
    b_o = tl.dot(b_qd, b_h, input_precision=PREC) + tl.dot(b_a, b_vn, input_precision=PREC)
    tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=mrv)


def chunk_layout(bounds, device):
    """Chunk start/end token and each sequence's first chunk, as device int32 tensors."""
    starts, ends, first = [], [], [0]
    for s, e in bounds:
        for c in range(s, e, BT):
            starts.append(c)
            ends.append(e)
        first.append(len(starts))
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(starts), as_t(ends), as_t(first)


def chunk_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    q, k, v, g, beta = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta))
    total = B * T
    starts, ends, first = chunk_layout(seq_bounds(B, T, cu_seqlens), q.device)
    NC = starts.numel()
    BK = triton.next_power_of_2(K)
    BVfull = triton.next_power_of_2(V)
    BV = min(BVfull, 64)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    f32 = dict(dtype=torch.float32, device=q.device)
    gc = torch.empty(total, H, K, **f32)
    Aqk = torch.empty(NC, H, BT, BT, **f32)
    Akk = torch.empty(NC, H, BT, BT, **f32)
    w = torch.empty(total, H, K, **f32)
    u = torch.empty(total, H, V, **f32)
    v_new = torch.empty(total, H, V, **f32)
    h = torch.empty(NC, H, K, V, **f32)
    o = torch.empty(total, H, V, dtype=v.dtype, device=q.device)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if NC:
        _cumsum_kernel[(NC, H)](g, gc, starts, ends, H=H, K=K, BT=BT, BK=BK)
        _intra_kernel[(NC, H)](q, k, gc, beta, Aqk, Akk, starts, ends, scale,
                               H=H, K=K, BT=BT, BC=BC, BK=BK, PREC=prec)
        _solve_kernel[(NC, H)](k, v, gc, beta, Akk, w, u, starts, ends,
                               H=H, K=K, V=V, BT=BT, BK=BK, BV=BVfull, PREC=prec, num_warps=8)
    _state_kernel[(N, H, triton.cdiv(V, BV))](
        k, gc, w, u, v_new, h, h0, ht, first, starts, ends,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_H0=h0 is not None, STORE_HT=ht is not None,
        PREC=prec, num_warps=8)
    if NC:
        _output_kernel[(NC, H, triton.cdiv(V, BV))](
            q, gc, h, Aqk, v_new, o, starts, ends, scale,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec, num_warps=4)
    return o.reshape(B, T, H, V), ht
