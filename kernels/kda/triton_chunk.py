"""Triton chunked KDA prefill (forward only), in five launches over chunks of 64 tokens.

The algebra is the one in `kernels/kda/cpu.py` (UT transform, then a state pass):
  1. `_cumsum_kernel`  per chunk: gc = cumulative log-decay inside the chunk (fp32).
  2. `_intra_kernel`   per chunk: Aqk (s <= t) and beta*Akk (s < t) from 16x16 blocks. Off-diagonal
                       blocks are one dot each, both factors taken relative to the block row's first
                       token. `_intra_diag_kernel`, one program per diagonal block: exactly
                       pairwise, row by row. Exponents are clamped at 0,
                       a no-op for valid entries (all <= 0) that keeps padded rows finite.
  3. `_solve_kernel`   per chunk: X = (I + beta*Akk)^-1 (16x16 diagonal blocks by forward
                       substitution, merged by dots), w = X (beta e^gc k), u = X (beta v), and
                       kend = k e^(gc_C - gc), e^gc_C for the state pass.
  4. `_state_kernel`   per sequence and V-block, sequential over its chunks: stores the state
                       entering each chunk, v_new = u - w S (over u), and S = e^gc_C S + kendᵀ v_new.
  5. `_output_kernel`  per chunk and V-block: o = (q e^gc) S + Aqk v_new.
Intermediates are fp32 (the per-chunk states h: the input dtype for bf16/fp16 inputs). Dots on fp32 inputs use exact fp32 ('ieee'); on bf16/fp16 inputs, tf32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .args import check_kda_args, l2norm, seq_bounds

BT = 64   # chunk
BC = 16   # sub-block


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    """bf16 operands with fp32 accumulation for bf16/fp16 inputs (as fla does); exact fp32 else."""
    if LOWP:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


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
    """One 16-row block i of a chunk: its off-diagonal blocks j < i (one dot each) and the zero
    blocks j > i. (The diagonal block is `_intra_diag_kernel`'s.)"""
    i_c, i_h, i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    o_k = tl.arange(0, BK)
    mk = o_k < K
    o_c = tl.arange(0, BC)
    a_base = (i_c * H + i_h).to(tl.int64) * BT * BT
    rows_i = start + i * BC + o_c
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(i + 1, BT // BC):
        a_off = a_base + (i * BC + o_c)[:, None] * BT + (j * BC + o_c)[None, :]
        tl.store(Aqk + a_off, zero)
        tl.store(Akk + a_off, zero)
    if i > 0:
        mi = (rows_i < end)[:, None] & mk[None, :]
        off_i = (rows_i[:, None] * H + i_h) * K + o_k[None, :]
        b_gi = tl.load(gc + off_i, mask=mi, other=0.0)
        b_beta = tl.load(beta + rows_i * H + i_h, mask=rows_i < end, other=0.0).to(tl.float32)
        # reference token: the first of block i; both factors' exponents are <= 0
        b_g0 = tl.load(gc + ((start + i * BC) * H + i_h) * K + o_k, mask=mk, other=0.0)
        left = tl.exp(tl.minimum(b_gi - b_g0[None, :], 0.0))
        b_lq = tl.load(q + off_i, mask=mi, other=0.0).to(tl.float32) * scale * left
        b_lk = tl.load(k + off_i, mask=mi, other=0.0).to(tl.float32) * left
        for j in range(0, i):
            rows_j = start + j * BC + o_c
            mj = (rows_j < end)[:, None] & mk[None, :]
            off_j = (rows_j[:, None] * H + i_h) * K + o_k[None, :]
            b_kj = tl.load(k + off_j, mask=mj, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + off_j, mask=mj, other=0.0)
            b_rk = tl.trans(b_kj * tl.exp(tl.minimum(b_g0[None, :] - b_gj, 0.0)))
            a_off = a_base + (i * BC + o_c)[:, None] * BT + (j * BC + o_c)[None, :]
            tl.store(Aqk + a_off, tl.dot(b_lq, b_rk, input_precision=PREC))
            tl.store(Akk + a_off, tl.dot(b_lk, b_rk, input_precision=PREC) * b_beta[:, None])


@triton.jit
def _intra_diag_kernel(q, k, gc, beta, Aqk, Akk, chunk_start, chunk_end, scale,
                       H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Diagonal 16x16 block i of a chunk, exactly pairwise (exponent g_t - g_s <= 0 for s <= t):
    the block's k and g stay in registers while its 16 rows t are walked. Padded rows get zeros,
    so every entry of A is written (the solve's dots would turn unwritten garbage into NaN)."""
    i_c, i_h, i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    mk = o_k < K
    rows = start + i * BC + o_c
    m2 = (rows < end)[:, None] & mk[None, :]
    off = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_ks = tl.load(k + off, mask=m2, other=0.0).to(tl.float32)
    b_gs = tl.load(gc + off, mask=m2, other=0.0)
    a_base = (i_c * H + i_h).to(tl.int64) * BT * BT + i * BC * BT + i * BC
    for t in range(BC):
        i_t = start + i * BC + t
        # scalar conditions broadcast explicitly: the interpreter rejects scalar-and-vector masks
        valid_k = mk & ((i_t + 0 * o_k) < end)
        b_qt = tl.load(q + (i_t * H + i_h) * K + o_k, mask=valid_k, other=0.0).to(tl.float32) * scale
        b_kt = tl.load(k + (i_t * H + i_h) * K + o_k, mask=valid_k, other=0.0).to(tl.float32)
        b_gt = tl.load(gc + (i_t * H + i_h) * K + o_k, mask=valid_k, other=0.0)
        b_e = tl.exp(tl.minimum(b_gt[None, :] - b_gs, 0.0)) * b_ks
        b_beta = tl.load(beta + tl.minimum(i_t, end - 1) * H + i_h).to(tl.float32)
        ms = (o_c <= t) & ((i_t + 0 * o_c) < end)
        b_aq = tl.where(ms, tl.sum(b_qt[None, :] * b_e, 1), 0.0)
        b_ak = tl.where(ms & (o_c < t), tl.sum(b_kt[None, :] * b_e, 1) * b_beta, 0.0)
        tl.store(Aqk + a_base + t * BT + o_c, b_aq)
        tl.store(Akk + a_base + t * BT + o_c, b_ak)


@triton.jit
def _inv_diag(Akk, a_base, i: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """(I + A_ii)^-1 of one 16x16 diagonal block, by forward substitution on its rows."""
    o_c = tl.arange(0, BC)
    b_x = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    for t in range(1, BC):
        b_a = tl.load(Akk + a_base + (i * BC + t) * BT + i * BC + o_c, mask=o_c < t, other=0.0)
        b_row = -tl.sum(b_a[:, None] * b_x, 0)
        b_row = tl.where(o_c == t, 1.0, b_row)
        b_x = tl.where(o_c[:, None] == t, b_row[None, :], b_x)
    return b_x


@triton.jit
def _ablock(Akk, a_base, i: tl.constexpr, j: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    o_c = tl.arange(0, BC)
    return tl.load(Akk + a_base + (i * BC + o_c)[:, None] * BT + (j * BC + o_c)[None, :])


@triton.jit
def _solve_kernel(k, v, gc, beta, Akk, w, u, kend, gexp, chunk_start, chunk_end,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr):
    """X = (I + beta*Akk)^-1 blockwise (4x4 blocks of 16), then w = X (beta e^gc k), u = X (beta v),
    and for the state pass kend = k e^(gc_C - gc) and e^(gc_C)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunk_start + i_c).to(tl.int64)
    end = tl.load(chunk_end + i_c).to(tl.int64)
    a_base = (i_c * H + i_h).to(tl.int64) * BT * BT
    X00 = _inv_diag(Akk, a_base, 0, BT, BC)
    X11 = _inv_diag(Akk, a_base, 1, BT, BC)
    X22 = _inv_diag(Akk, a_base, 2, BT, BC)
    X33 = _inv_diag(Akk, a_base, 3, BT, BC)
    A10 = _ablock(Akk, a_base, 1, 0, BT, BC)
    A20 = _ablock(Akk, a_base, 2, 0, BT, BC)
    A21 = _ablock(Akk, a_base, 2, 1, BT, BC)
    A30 = _ablock(Akk, a_base, 3, 0, BT, BC)
    A31 = _ablock(Akk, a_base, 3, 1, BT, BC)
    A32 = _ablock(Akk, a_base, 3, 2, BT, BC)
    # X_ij = -X_ii sum_{j <= m < i} A_im X_mj, in exact fp32: errors here feed every output
    X10 = -tl.dot(X11, tl.dot(A10, X00, input_precision="ieee"), input_precision="ieee")
    X21 = -tl.dot(X22, tl.dot(A21, X11, input_precision="ieee"), input_precision="ieee")
    X20 = -tl.dot(X22, tl.dot(A20, X00, input_precision="ieee") + tl.dot(A21, X10, input_precision="ieee"),
                  input_precision="ieee")
    X32 = -tl.dot(X33, tl.dot(A32, X22, input_precision="ieee"), input_precision="ieee")
    X31 = -tl.dot(X33, tl.dot(A31, X11, input_precision="ieee") + tl.dot(A32, X21, input_precision="ieee"),
                  input_precision="ieee")
    X30 = -tl.dot(X33, tl.dot(A30, X00, input_precision="ieee") + tl.dot(A31, X10, input_precision="ieee")
                  + tl.dot(A32, X20, input_precision="ieee"), input_precision="ieee")

    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    last = tl.minimum(start + BT, end) - 1
    b_glast = tl.load(gc + (last * H + i_h) * K + o_k, mask=mk, other=0.0)
    tl.store(gexp + (i_c * H + i_h).to(tl.int64) * K + o_k, tl.exp(b_glast), mask=mk)
    # right-hand sides, block by block: kb_j = beta e^gc k, vb_j = beta v (rows of block j)
    rows0 = start + o_c
    rows1 = rows0 + BC
    rows2 = rows1 + BC
    rows3 = rows2 + BC
    kb0, vb0 = _rhs(k, v, gc, beta, kend, b_glast, rows0, end, H, i_h, K, V, BK, BV)
    kb1, vb1 = _rhs(k, v, gc, beta, kend, b_glast, rows1, end, H, i_h, K, V, BK, BV)
    kb2, vb2 = _rhs(k, v, gc, beta, kend, b_glast, rows2, end, H, i_h, K, V, BK, BV)
    kb3, vb3 = _rhs(k, v, gc, beta, kend, b_glast, rows3, end, H, i_h, K, V, BK, BV)
    _store_rows(w, u, _dot(X00, kb0, LOWP), _dot(X00, vb0, LOWP), rows0, end, H, i_h, K, V, BK, BV)
    _store_rows(w, u, _dot(X10, kb0, LOWP) + _dot(X11, kb1, LOWP),
                _dot(X10, vb0, LOWP) + _dot(X11, vb1, LOWP), rows1, end, H, i_h, K, V, BK, BV)
    _store_rows(w, u, _dot(X20, kb0, LOWP) + _dot(X21, kb1, LOWP) + _dot(X22, kb2, LOWP),
                _dot(X20, vb0, LOWP) + _dot(X21, vb1, LOWP) + _dot(X22, vb2, LOWP),
                rows2, end, H, i_h, K, V, BK, BV)
    _store_rows(w, u, _dot(X30, kb0, LOWP) + _dot(X31, kb1, LOWP) + _dot(X32, kb2, LOWP) + _dot(X33, kb3, LOWP),
                _dot(X30, vb0, LOWP) + _dot(X31, vb1, LOWP) + _dot(X32, vb2, LOWP) + _dot(X33, vb3, LOWP),
                rows3, end, H, i_h, K, V, BK, BV)


@triton.jit
def _rhs(k, v, gc, beta, kend, b_glast, rows, end, H: tl.constexpr, i_h, K: tl.constexpr, V: tl.constexpr,
         BK: tl.constexpr, BV: tl.constexpr):
    """Load one 16-row block; store its kend rows; return beta e^gc k and beta v (fp32)."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mr = rows < end
    mrk = mr[:, None] & (o_k < K)[None, :]
    off_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_beta = tl.load(beta + rows * H + i_h, mask=mr, other=0.0).to(tl.float32)
    b_k = tl.load(k + off_k, mask=mrk, other=0.0).to(tl.float32)
    b_g = tl.load(gc + off_k, mask=mrk, other=0.0)
    tl.store(kend + off_k, (b_k * tl.exp(tl.minimum(b_glast[None, :] - b_g, 0.0))).to(kend.dtype.element_ty),
             mask=mrk)
    mrv = mr[:, None] & (o_v < V)[None, :]
    b_v = tl.load(v + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=mrv, other=0.0).to(tl.float32)
    return b_k * tl.exp(tl.minimum(b_g, 0.0)) * b_beta[:, None], b_v * b_beta[:, None]


@triton.jit
def _store_rows(w, u, b_w, b_u, rows, end, H: tl.constexpr, i_h, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mr = rows < end
    tl.store(w + (rows[:, None] * H + i_h) * K + o_k[None, :], b_w.to(w.dtype.element_ty),
             mask=mr[:, None] & (o_k < K)[None, :])
    tl.store(u + (rows[:, None] * H + i_h) * V + o_v[None, :], b_u.to(u.dtype.element_ty),
             mask=mr[:, None] & (o_v < V)[None, :])


@triton.jit
def _state_kernel(w, u, kend, gexp, h, h0, ht, cu_seqlens, seq_chunk_first,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  LOWP: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Sequential over one sequence's chunks; chunk addresses are affine in the loop counter so
    the loads of the next chunks are pipelined behind the current chunk's dots."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c0 = tl.load(seq_chunk_first + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
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
    for i_t in tl.range(0, NT, num_stages=NUM_STAGES):
        c = c0 + i_t
        tl.store(h + c * H * K * V + state_off, b_s.to(h.dtype.element_ty), mask=mh)
        rows = bos + i_t * BT + o_t
        mr = rows < eos
        mrk = mr[:, None] & mk[None, :]
        mrv = mr[:, None] & mv[None, :]
        off_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        b_w = tl.load(w + off_k, mask=mrk, other=0.0)
        b_ke = tl.load(kend + off_k, mask=mrk, other=0.0)
        b_ge = tl.load(gexp + (c * H + i_h) * K + o_k, mask=mk, other=1.0)
        b_vn = tl.load(u + off_v, mask=mrv, other=0.0) - _dot(b_w, b_s, LOWP)
        tl.store(u + off_v, b_vn, mask=mrv)     # v_new overwrites u
        b_s = b_s * b_ge[:, None] + _dot(tl.trans(b_ke), b_vn, LOWP)
    if STORE_HT:
        tl.store(ht + i_n.to(tl.int64) * H * K * V + state_off, b_s, mask=mh)


@triton.jit
def _output_kernel(q, gc, h, Aqk, v_new, o, chunk_start, chunk_end, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr):
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
                  mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    a_off = (i_c * H + i_h).to(tl.int64) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    b_a = tl.load(Aqk + a_off)
    off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    mrv = mr[:, None] & mv[None, :]
    b_vn = tl.load(v_new + off_v, mask=mrv, other=0.0)
    b_o = _dot(b_qd, b_h, LOWP) + _dot(b_a, b_vn, LOWP)
    tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=mrv)


def chunk_layout(bounds, device):
    """Chunk start/end tokens, sequence bounds and each sequence's first chunk (device int32)."""
    starts, ends, first, cu = [], [], [0], [0]
    for s, e in bounds:
        for c in range(s, e, BT):
            starts.append(c)
            ends.append(e)
        first.append(len(starts))
        cu.append(e)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(starts), as_t(ends), as_t(first), as_t(cu)


def chunk_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, state_bv=32, state_stages=3):
    if state_bv not in (32, 64, 128):
        # BV=16 faulted (illegal address) in the state pass on an H200 with Triton 3.6
        raise ValueError(f"state_bv must be 32, 64 or 128, got {state_bv}")
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    q, k, v, g, beta = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta))
    total = B * T
    starts, ends, first, cu = chunk_layout(seq_bounds(B, T, cu_seqlens), q.device)
    NC = starts.numel()
    BK = triton.next_power_of_2(K)
    BVfull = triton.next_power_of_2(V)
    BV = min(BVfull, 64)
    # bf16 dot operands for low-precision inputs; the interpreter (numpy) has no bf16 matmul
    lowp = q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1"
    prec = "tf32" if lowp else "ieee"
    f32 = dict(dtype=torch.float32, device=q.device)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if NC == 0:
        if ht is not None:
            ht.copy_(h0) if h0 is not None else ht.zero_()
        return v.new_empty(B, T, H, V), ht
    # allocation order keeps the peak low at 1M tokens: Akk is freed before h exists,
    # and v_new overwrites u in place (each chunk's rows are read, then written, by one program)
    gc = torch.empty(total, H, K, **f32)
    _cumsum_kernel[(NC, H)](g, gc, starts, ends, H=H, K=K, BT=BT, BK=BK)
    Aqk = torch.empty(NC, H, BT, BT, **f32)
    Akk = torch.empty(NC, H, BT, BT, **f32)
    _intra_kernel[(NC, H, BT // BC)](q, k, gc, beta, Aqk, Akk, starts, ends, scale,
                           H=H, K=K, BT=BT, BC=BC, BK=BK, PREC=prec)
    _intra_diag_kernel[(NC, H, BT // BC)](q, k, gc, beta, Aqk, Akk, starts, ends, scale,
                                          H=H, K=K, BT=BT, BC=BC, BK=BK, num_warps=4)
    low = q.dtype if lowp else torch.float32   # what the state pass reads as dot operands
    w = torch.empty(total, H, K, dtype=low, device=q.device)
    kend = torch.empty(total, H, K, dtype=low, device=q.device)
    u = torch.empty(total, H, V, **f32)
    gexp = torch.empty(NC, H, K, **f32)
    _solve_kernel[(NC, H)](k, v, gc, beta, Akk, w, u, kend, gexp, starts, ends,
                           H=H, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BVfull, LOWP=lowp, num_warps=4)
    del Akk
    # the state entering each chunk; fp32 for fp32 inputs, else the input dtype (as fla does)
    h = torch.empty(NC, H, K, V, dtype=low, device=q.device)
    sbv = min(BVfull, state_bv)
    _state_kernel[(triton.cdiv(V, sbv), N * H)](
        w, u, kend, gexp, h, h0, ht, cu, first,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=sbv, HAS_H0=h0 is not None, STORE_HT=ht is not None,
        LOWP=lowp, NUM_STAGES=state_stages, num_warps=4)
    del w, kend
    o = torch.empty(total, H, V, dtype=v.dtype, device=q.device)
    _output_kernel[(NC, H, triton.cdiv(V, BV))](
        q, gc, h, Aqk, u, o, starts, ends, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, LOWP=lowp, num_warps=4)
    return o.reshape(B, T, H, V), ht
