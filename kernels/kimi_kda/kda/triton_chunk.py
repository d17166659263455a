"""Triton chunked KDA prefill (forward only), in six launches over chunks of 64 tokens.

The algebra is the one in `kimi_kda/kda/cpu.py` (UT transform, then a state pass); the intra-chunk
stage follows fla-core's structure (token-parallel diagonal blocks, off-diagonal blocks fused with
the triangular solve, then w and u), with our own state and output passes:
  1. `_cumsum_kernel`  per chunk and K-block: gc = cumulative log-decay inside the chunk (fp32);
                       with the gate in the kernel, g = -exp(A_log) softplus(f + dt_bias) is made
                       from the raw projection f in the same pass (g never reaches memory).
  2. `_diag_kernel`    per token and pair of heads: row t of its diagonal 16x16 block of Aqk and
                       beta*Akk, exactly pairwise: walking s = t, t-1, ... back to the block's
                       first token, gc_t - gc_s is summed from g on the way (every exponent <= 0);
                       with the gate in the kernel there is no g in memory, and gc_t - gc_s is
                       taken from gc. With the l2norm in the kernel it also computes 1/|q_t| and
                       1/|k_t| (rq, rk) from the rows it loads anyway, for the later launches.
  3. `_solve_kernel`   per chunk: the off-diagonal blocks (one dot each, both factors relative to
                       the last token of the block before: exponents <= 0), stored for Aqk and kept
                       in registers for Akk; then Ai = (I + beta Akk)^-1 (diagonal blocks by forward
                       substitution, merged by dots).
  4. `_wu_kernel`      per chunk: w = Ai (beta e^gc k), u = Ai (beta v), kend = k e^(gc_C - gc),
                       qg = q e^gc scale, e^gc_C.
  5. `_state_kernel`   per sequence and V-block, sequential over its chunks: stores the state
                       entering each chunk, v_new = u - w S (over u), and S = e^gc_C S + kendᵀ v_new.
  6. `_output_kernel`  per chunk and V-block: o = qg S + Aqk v_new.
Fused pre-processing (fla's `use_gate_in_kernel`, `use_beta_sigmoid_in_kernel`,
`use_qk_l2norm_in_kernel`): beta = sigmoid(logits) is recomputed wherever beta is loaded (a few
values per program); q and k are never normalised in memory: every launch that reads them scales
its rows by rq / rk. Akk[t, s] and Aqk[t, s] also carry rk_s as a column factor, which the
diagonal kernel does not know for s != t: the stored Aqk (all of it) and Akk's diagonal blocks
leave it out, and their readers (solve, output) apply it. q, k and v may be row-strided views
(the layer's split of one [T, 3HK] conv output): only the token stride is passed, nothing copied.
Intermediates between launches are in the input dtype (bf16 for bf16 inputs, as fla keeps them),
except gc and the diagonal blocks of Akk (fp32). Dots on fp32 inputs use exact fp32 ('ieee'); on
bf16/fp16 inputs the decay products and the solve use tf32, the rest bf16 operands with fp32
accumulation. Chunk bounds are computed in the kernels for fixed-length batches and read from a
(cached) layout for packed sequences.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..rows import token_rows
from .args import check_kda_args, chunk_layout_host, output_buffer, seq_bounds

BT = 64   # chunk
BC = 16   # sub-block
L2NORM_EPS = tl.constexpr(1e-6)   # fla's l2norm: x / sqrt(sum(x^2) + eps)


# What changes with every batch: the token count, chunks per sequence, and the chunk layout's
# index arrays (views into one buffer, so their 16-byte alignment varies with the lengths before
# them). Triton compiles a kernel again for each new class of these (an int == 1, a multiple of
# 16 or other; a pointer aligned or not), each a stall of seconds in a running server (vLLM: "Triton
# kernel JIT compilation during inference", seen on the H200 at the first request after the
# profile run). Unspecialised, the one compile of vLLM's profile run
# (KimiDeltaAttention._profile_prefill) serves every later batch.
# (A kernel with other names, _state_kernel, lists its own.)
PER_STEP_CHUNK_ARGS = ("T", "NCS", "chunk_start", "chunk_end")


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    """bf16 operands with fp32 accumulation for bf16/fp16 inputs (as fla does); exact fp32 else."""
    if LOWP:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


@triton.jit
def _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN: tl.constexpr, BT: tl.constexpr):
    """First token and sequence end of chunk i_c: read from the layout for packed sequences,
    computed for B sequences of length T (NCS chunks each; saves a dependent load)."""
    if VARLEN:
        start = tl.load(chunk_start + i_c).to(tl.int64)
        end = tl.load(chunk_end + i_c).to(tl.int64)
    else:
        b = (i_c // NCS).to(tl.int64)
        start = b * T + (i_c % NCS).to(tl.int64) * BT
        end = b * T + T
    return start, end


@triton.jit
def _load_beta(beta, off, mask, SIGMOID: tl.constexpr):
    """beta (fp32) at `off`, from its logits when SIGMOID; 0 where masked."""
    b = tl.load(beta + off, mask=mask, other=0.0).to(tl.float32)
    if SIGMOID:
        b = tl.where(mask, tl.sigmoid(b), 0.0)
    return b


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20); log(1 + e) loses e below ~1e-7, where e is the answer."""
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit(do_not_specialize=PER_STEP_CHUNK_ARGS)
def _cumsum_kernel(g, gc, A_log, dt_bias, chunk_start, chunk_end, T, NCS, H: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, VARLEN: tl.constexpr, GATE: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """gc of one chunk, head and K-block. With GATE, g is the raw projection f (any dtype) and the
    gate -exp(A_log) softplus(f + dt_bias) is applied on the way in: one read of f (bf16 in the
    layer) and one fp32 write, instead of the gate's own passes over [T, H, K] and a read of g."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN, BT)
    rows = start + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (rows < end)[:, None] & (o_k < K)[None, :]
    off = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    if GATE:
        if HAS_BIAS:
            b_g += tl.load(dt_bias + i_h * K + o_k, mask=o_k < K, other=0.0).to(tl.float32)[None, :]
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_g = tl.where(m, -b_a * _softplus(b_g), 0.0)
    tl.store(gc + off, tl.cumsum(b_g, 0), mask=m)


@triton.jit(do_not_specialize=PER_STEP_CHUNK_ARGS)
def _diag_kernel(q, k, g, gc, beta, Aqk, Akkd, rq, rk, chunk_start, chunk_end, scale, T, NCS, sq, sk,
                 H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 BH: tl.constexpr, VARLEN: tl.constexpr, DECAY_FROM_GC: tl.constexpr,
                 BETA_SIGMOID: tl.constexpr, QK_NORM: tl.constexpr):
    """One token t and BH heads: row t of its diagonal 16x16 block, exactly pairwise. Walking
    s = t, t-1, ... back to the block's first token, gc_t - gc_s = sum_{s < y <= t} g_y is summed
    on the way (no cumulative decay needed, every exponent <= 0), or, when g is not in memory
    (gate in the kernel), read as gc_t - gc_s. Entries s > t are never written (readers mask
    them). With QK_NORM, rq_t and rk_t are stored and the rows scaled by them; the column factor
    rk_s is left to the readers. sq, sk: token strides of q and k."""
    pid = tl.program_id(0)
    i_c = pid // BT
    start, end = _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN, BT)
    i_t = start + pid % BT
    if i_t < end:
        i_s = start + ((pid % BT) // BC) * BC     # first token of the block
        o_h = tl.program_id(1) * BH + tl.arange(0, BH)
        o_k = tl.arange(0, BK)
        mh = o_h < H
        m = mh[:, None] & (o_k < K)[None, :]
        p_head = o_h[:, None] * K + o_k[None, :]    # within one token's [H, K] row
        b_q = tl.load(q + i_t * sq + p_head, mask=m, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_t * sk + p_head, mask=m, other=0.0).to(tl.float32)
        b_beta = _load_beta(beta, i_t * H + o_h, mh, BETA_SIGMOID)
        b_qs = tl.zeros([BH], dtype=tl.float32) + scale
        if QK_NORM:
            b_rq = tl.rsqrt(tl.sum(b_q * b_q, 1) + L2NORM_EPS)
            b_rk = tl.rsqrt(tl.sum(b_k * b_k, 1) + L2NORM_EPS)
            tl.store(rq + i_t * H + o_h, b_rq, mask=mh)
            tl.store(rk + i_t * H + o_h, b_rk, mask=mh)
            b_qs *= b_rq
            b_beta *= b_rk
        b_q *= b_qs[:, None]
        b_kb = b_k * b_beta[:, None]
        if DECAY_FROM_GC:
            b_gt = tl.load(gc + i_t * H * K + p_head, mask=m, other=0.0)
        b_d = tl.zeros([BH, BK], dtype=tl.float32)
        for n in range(0, i_t - i_s + 1):
            j = i_t - n
            if DECAY_FROM_GC:
                b_e = tl.exp(tl.minimum(b_gt - tl.load(gc + j * H * K + p_head, mask=m, other=0.0), 0.0))
            else:
                b_e = tl.exp(b_d)
                b_d += tl.load(g + j * H * K + p_head, mask=m, other=0.0).to(tl.float32)
            b_kg = tl.load(k + j * sk + p_head, mask=m, other=0.0).to(tl.float32) * b_e
            tl.store(Aqk + (i_t * H + o_h) * BT + (j - start),
                     tl.sum(b_q * b_kg, 1).to(Aqk.dtype.element_ty), mask=mh)
            b_akk = tl.sum(b_kb * b_kg, 1) * tl.where(n > 0, 1.0, 0.0)
            tl.store(Akkd + (i_t * H + o_h) * BC + (j - i_s), b_akk, mask=mh)


@triton.jit
def _load_block(q, k, gc, rows, end, H: tl.constexpr, i_h, K: tl.constexpr, o_k, mk, sq, sk):
    """One 16-row block of q, k (fp32) and gc, and gc of the block's last token."""
    m = (rows < end)[:, None] & mk[None, :]
    b_q = tl.load(q + rows[:, None] * sq + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + rows[:, None] * sk + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    b_gc = tl.load(gc + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=m, other=0.0)
    last = tl.max(rows, 0)
    b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=mk & ((last + 0 * o_k) < end), other=0.0)
    return b_q, b_k, b_gc, b_gl


@triton.jit
def _decayed_block(q, k, gc, rows, end, H: tl.constexpr, i_h, K: tl.constexpr, o_k, mk, sq, sk, b_r):
    """`_load_block` of a later block row, its q and k rows also decayed by exp(gc_t - r):
    (q * f, k * f, k, gc, gc of its last token)."""
    b_q, b_k, b_gc, b_gl = _load_block(q, k, gc, rows, end, H, i_h, K, o_k, mk, sq, sk)
    f = tl.exp(tl.minimum(b_gc - b_r[None, :], 0.0))
    return b_q * f, b_k * f, b_k, b_gc, b_gl


@triton.jit
def _offdiag(b_a, b_b, b_kj, b_gcj, b_r, Aq, Ak, PREC: tl.constexpr):
    """Block (i, j < i): rows already carry exp(gc_t - r); columns get exp(r - gc_s)."""
    b_c = tl.trans(b_kj * tl.exp(tl.minimum(b_r[None, :] - b_gcj, 0.0)))
    Aq = tl.dot(b_a, b_c, Aq, input_precision=PREC)
    Ak = tl.dot(b_b, b_c, Ak, input_precision=PREC)
    return Aq, Ak


@triton.jit
def _inv_diag(Akkd, r0, end, H: tl.constexpr, i_h, BC: tl.constexpr, b_col):
    """(I + A)^-1 of the diagonal 16x16 block of rows r0.., by forward substitution over its rows
    (entries on and above the diagonal were never written: masked). b_col [BC]: the column
    factor the stored rows leave out (rk of the block's tokens, or ones)."""
    o_i = tl.arange(0, BC)
    rows = r0 + o_i
    b_a = tl.load(Akkd + (rows[:, None] * H + i_h) * BC + o_i[None, :], mask=(rows < end)[:, None], other=0.0)
    b_x = -tl.where(o_i[:, None] > o_i[None, :], b_a, 0.0) * b_col[None, :]
    n = tl.minimum(end - r0, BC)
    for i in range(2, n):
        b_r = -tl.where(o_i < i, tl.load(Akkd + ((r0 + i) * H + i_h) * BC + o_i), 0.0) * b_col
        b_r += tl.sum(b_r[:, None] * b_x, 0)
        b_x = tl.where((o_i == i)[:, None], b_r[None, :], b_x)
    return b_x + tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)


@triton.jit
def _store_block(ptr, rows, end, H: tl.constexpr, i_h, j: tl.constexpr, val, o_i,
                 BT: tl.constexpr, BC: tl.constexpr):
    """A [BC, BC] block into rows `rows`, columns j*BC.. of a [T, H, BT] matrix."""
    tl.store(ptr + (rows[:, None] * H + i_h) * BT + (j * BC + o_i)[None, :], val.to(ptr.dtype.element_ty),
             mask=(rows < end)[:, None])


@triton.jit
def _row_norm(r, rows, end, H: tl.constexpr, i_h, QK_NORM: tl.constexpr):
    """1/|x| of each row (stored by the diagonal kernel) with QK_NORM, else ones; 0 past `end`."""
    if QK_NORM:
        n = tl.load(r + rows * H + i_h, mask=rows < end, other=0.0)
    else:
        n = tl.where(rows < end, 1.0, 0.0)
    return n


@triton.jit(do_not_specialize=PER_STEP_CHUNK_ARGS)
def _solve_kernel(q, k, gc, beta, Aqk, Akkd, Ai, rq, rk, chunk_start, chunk_end, scale, T, NCS, sq, sk,
                  H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, VARLEN: tl.constexpr,
                  BETA_SIGMOID: tl.constexpr, QK_NORM: tl.constexpr):
    """Per chunk and head: the off-diagonal blocks of Aqk (stored) and beta*Akk (kept), then
    Ai = (I + beta Akk)^-1 from the diagonal blocks' forward substitution and block merges.
    With QK_NORM, q and k rows are normalised by scaling the finished blocks (rows by rq or rk,
    Akk's columns by rk; Aqk's columns are left to the output kernel)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, end = _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN, BT)
    o_i = tl.arange(0, BC)
    rows0 = start + o_i
    rows1 = rows0 + BC
    rows2 = rows1 + BC
    rows3 = rows2 + BC
    z = tl.zeros([BC, BC], dtype=tl.float32)
    Aq10, Aq20, Aq21, Aq30, Aq31, Aq32 = z, z, z, z, z, z
    Ak10, Ak20, Ak21, Ak30, Ak31, Ak32 = z, z, z, z, z, z
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        _, k0, gc0, gl = _load_block(q, k, gc, rows0, end, H, i_h, K, o_k, mk, sq, sk)
        r = gl   # gc of the last token of block 0: the reference of block row 1
        a, b, k1, gc1, gl = _decayed_block(q, k, gc, rows1, end, H, i_h, K, o_k, mk, sq, sk, r)
        Aq10, Ak10 = _offdiag(a, b, k0, gc0, r, Aq10, Ak10, PREC)
        r = gl
        a, b, k2, gc2, gl = _decayed_block(q, k, gc, rows2, end, H, i_h, K, o_k, mk, sq, sk, r)
        Aq20, Ak20 = _offdiag(a, b, k0, gc0, r, Aq20, Ak20, PREC)
        Aq21, Ak21 = _offdiag(a, b, k1, gc1, r, Aq21, Ak21, PREC)
        r = gl
        a, b, _, _, _ = _decayed_block(q, k, gc, rows3, end, H, i_h, K, o_k, mk, sq, sk, r)
        Aq30, Ak30 = _offdiag(a, b, k0, gc0, r, Aq30, Ak30, PREC)
        Aq31, Ak31 = _offdiag(a, b, k1, gc1, r, Aq31, Ak31, PREC)
        Aq32, Ak32 = _offdiag(a, b, k2, gc2, r, Aq32, Ak32, PREC)
    # row factors: scale * rq for Aqk, beta * rk for Akk (ones and beta without QK_NORM)
    q1s = (_row_norm(rq, rows1, end, H, i_h, QK_NORM) * scale)[:, None]
    q2s = (_row_norm(rq, rows2, end, H, i_h, QK_NORM) * scale)[:, None]
    q3s = (_row_norm(rq, rows3, end, H, i_h, QK_NORM) * scale)[:, None]
    _store_block(Aqk, rows1, end, H, i_h, 0, Aq10 * q1s, o_i, BT, BC)
    _store_block(Aqk, rows2, end, H, i_h, 0, Aq20 * q2s, o_i, BT, BC)
    _store_block(Aqk, rows2, end, H, i_h, 1, Aq21 * q2s, o_i, BT, BC)
    _store_block(Aqk, rows3, end, H, i_h, 0, Aq30 * q3s, o_i, BT, BC)
    _store_block(Aqk, rows3, end, H, i_h, 1, Aq31 * q3s, o_i, BT, BC)
    _store_block(Aqk, rows3, end, H, i_h, 2, Aq32 * q3s, o_i, BT, BC)

    n0 = _row_norm(rk, rows0, end, H, i_h, QK_NORM)
    n1 = _row_norm(rk, rows1, end, H, i_h, QK_NORM)
    n2 = _row_norm(rk, rows2, end, H, i_h, QK_NORM)
    n3 = _row_norm(rk, rows3, end, H, i_h, QK_NORM)
    b1 = (_load_beta(beta, rows1 * H + i_h, rows1 < end, BETA_SIGMOID) * n1)[:, None]
    b2 = (_load_beta(beta, rows2 * H + i_h, rows2 < end, BETA_SIGMOID) * n2)[:, None]
    b3 = (_load_beta(beta, rows3 * H + i_h, rows3 < end, BETA_SIGMOID) * n3)[:, None]
    A10 = Ak10 * b1 * n0[None, :]
    A20 = Ak20 * b2 * n0[None, :]
    A21 = Ak21 * b2 * n1[None, :]
    A30 = Ak30 * b3 * n0[None, :]
    A31 = Ak31 * b3 * n1[None, :]
    A32 = Ak32 * b3 * n2[None, :]
    X00 = _inv_diag(Akkd, start + 0, end, H, i_h, BC, n0)
    X11 = _inv_diag(Akkd, start + 16, end, H, i_h, BC, n1)
    X22 = _inv_diag(Akkd, start + 32, end, H, i_h, BC, n2)
    X33 = _inv_diag(Akkd, start + 48, end, H, i_h, BC, n3)
    # X_ij = -X_ii sum_{j <= m < i} A_im X_mj
    X10 = -tl.dot(X11, tl.dot(A10, X00, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    X21 = -tl.dot(X22, tl.dot(A21, X11, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    X20 = -tl.dot(X22, tl.dot(A20, X00, input_precision=SOLVE_PREC)
                  + tl.dot(A21, X10, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    X32 = -tl.dot(X33, tl.dot(A32, X22, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    X31 = -tl.dot(X33, tl.dot(A31, X11, input_precision=SOLVE_PREC)
                  + tl.dot(A32, X21, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    X30 = -tl.dot(X33, tl.dot(A30, X00, input_precision=SOLVE_PREC)
                  + tl.dot(A31, X10, input_precision=SOLVE_PREC)
                  + tl.dot(A32, X20, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    _store_block(Ai, rows0, end, H, i_h, 0, X00, o_i, BT, BC)
    _store_block(Ai, rows1, end, H, i_h, 0, X10, o_i, BT, BC)
    _store_block(Ai, rows1, end, H, i_h, 1, X11, o_i, BT, BC)
    _store_block(Ai, rows2, end, H, i_h, 0, X20, o_i, BT, BC)
    _store_block(Ai, rows2, end, H, i_h, 1, X21, o_i, BT, BC)
    _store_block(Ai, rows2, end, H, i_h, 2, X22, o_i, BT, BC)
    _store_block(Ai, rows3, end, H, i_h, 0, X30, o_i, BT, BC)
    _store_block(Ai, rows3, end, H, i_h, 1, X31, o_i, BT, BC)
    _store_block(Ai, rows3, end, H, i_h, 2, X32, o_i, BT, BC)
    _store_block(Ai, rows3, end, H, i_h, 3, X33, o_i, BT, BC)


@triton.jit(do_not_specialize=PER_STEP_CHUNK_ARGS)
def _wu_kernel(q, k, v, gc, beta, Ai, qg, kend, w, u, gexp, rq, rk, chunk_start, chunk_end, scale, T, NCS,
               sq, sk, sv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, VARLEN: tl.constexpr,
               BETA_SIGMOID: tl.constexpr, QK_NORM: tl.constexpr):
    """Per chunk and head: w = Ai (beta e^gc k), u = Ai (beta v), kend = k e^(gc_C - gc),
    qg = q e^gc scale and e^gc_C (q, k normalised here with QK_NORM: rows times rq, rk)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, end = _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    mr = rows < end
    b_x = tl.load(Ai + (rows[:, None] * H + i_h) * BT + o_t[None, :],
                  mask=mr[:, None] & ((o_t[:, None] // BC) >= (o_t[None, :] // BC)), other=0.0)
    b_beta = _load_beta(beta, rows * H + i_h, mr, BETA_SIGMOID)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = mr[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + rows[:, None] * sv + i_h * V + o_v[None, :], mask=m, other=0.0).to(tl.float32)
        b_u = _dot(b_x, b_v * b_beta[:, None], LOWP)
        tl.store(u + (rows[:, None] * H + i_h) * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m)
    b_qs = (_row_norm(rq, rows, end, H, i_h, QK_NORM) * scale)[:, None]
    b_kn = _row_norm(rk, rows, end, H, i_h, QK_NORM)[:, None]
    b_kb = b_kn * b_beta[:, None]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        m = mr[:, None] & mk[None, :]
        off = (rows[:, None] * H + i_h) * K + o_k[None, :]
        b_gc = tl.load(gc + off, mask=m, other=0.0)
        last = tl.minimum(start + BT, end) - 1     # the chunk's last token
        b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=mk, other=0.0)
        tl.store(gexp + (i_c * H + i_h).to(tl.int64) * K + o_k, tl.exp(b_gl), mask=mk)
        b_e = tl.exp(tl.minimum(b_gc, 0.0))
        b_q = tl.load(q + rows[:, None] * sq + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(qg + off, (b_q * b_e * b_qs).to(qg.dtype.element_ty), mask=m)
        b_k = tl.load(k + rows[:, None] * sk + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_kend = b_k * b_kn * tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.0))
        tl.store(kend + off, b_kend.to(kend.dtype.element_ty), mask=m)
        b_w = _dot(b_x, b_k * b_e * b_kb, LOWP)
        tl.store(w + off, b_w.to(w.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=("cu_seqlens", "seq_chunk_first"))
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
        b_vn = tl.load(u + off_v, mask=mrv, other=0.0).to(tl.float32) - _dot(b_w, b_s, LOWP)
        tl.store(u + off_v, b_vn.to(u.dtype.element_ty), mask=mrv)     # v_new overwrites u
        b_s = b_s * b_ge[:, None] + _dot(tl.trans(b_ke), b_vn, LOWP)
    if STORE_HT:
        tl.store(ht + i_n.to(tl.int64) * H * K * V + state_off, b_s, mask=mh)


@triton.jit(do_not_specialize=PER_STEP_CHUNK_ARGS)
def _output_kernel(qg, h, Aqk, v_new, o, rk, chunk_start, chunk_end, T, NCS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, VARLEN: tl.constexpr,
                   QK_NORM: tl.constexpr):
    """o = qg S + Aqk v_new; with QK_NORM, Aqk's columns get their rk here (see the module doc)."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = _bounds(i_c, chunk_start, chunk_end, T, NCS, VARLEN, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    rows = start + o_t
    mr = rows < end
    mv = o_v < V
    h_base = h + (i_c * H + i_h).to(tl.int64) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        b_q = tl.load(qg + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        b_o += _dot(b_q, b_h, LOWP)
    b_a = tl.load(Aqk + (rows[:, None] * H + i_h) * BT + o_t[None, :],
                  mask=mr[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.0)
    if QK_NORM:
        b_a = b_a.to(tl.float32) * tl.load(rk + rows * H + i_h, mask=mr, other=0.0)[None, :]
    off_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    mrv = mr[:, None] & mv[None, :]
    b_vn = tl.load(v_new + off_v, mask=mrv, other=0.0)
    b_o += _dot(b_a, b_vn, LOWP)
    tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=mrv)


_LAYOUTS: dict = {}


def device_chunk_layout(B, T, cu_seqlens, device):
    """`args.chunk_layout_host` as device int32 tensors, cached: a fixed-length batch needs no host
    work and no copy after the first call. Reads `cu_seqlens` on the host; a caller that must not
    synchronise (vLLM's metadata builder) builds the layout itself and passes `chunk_layout=`."""
    key = (B, T, None if cu_seqlens is None else tuple(cu_seqlens.tolist()), str(device))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    out = tuple(as_t(x) for x in chunk_layout_host(seq_bounds(B, T, cu_seqlens), BT))
    if len(_LAYOUTS) > 64:
        _LAYOUTS.clear()
    _LAYOUTS[key] = out
    return out


# block shapes: the best of a sweep at T = 128K, H = 32 on an H200 (gpu_bench's tune section);
# the cumsum's K-block from a sweep of the gated cumsum at 256K, H = 32 (64: 2.44 ms, 128: 3.05)
DEFAULTS = dict(cumsum_bk=64, cumsum_warps=4, diag_bh=2, diag_warps=1, solve_bk=16, solve_warps=1,
                solve_prec="tf32", wu_bk=128, wu_bv=128, wu_warps=8, wu_stages=2, out_bk=64, out_bv=128,
                out_warps=4, state_bv=32, state_stages=4)


def chunk_kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_layout=None,
                     use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None,
                     out=None, **cfg):
    """`chunk_layout`: the four device tensors of `args.chunk_layout_host` for `cu_seqlens`, built
    ahead (no host read here then). `use_gate_in_kernel`: g is the raw gate projection f and
    g = -exp(A_log) softplus(f + dt_bias) is applied in the cumsum launch; `use_beta_sigmoid_in_kernel`:
    beta holds logits; `use_qk_l2norm_in_kernel`: q and k are normalised inside the kernels (never
    in memory). `out` [B, T, H, V] (optional): a contiguous tensor of v's dtype the output kernel
    writes, e.g. the layer's buffer. `cfg` overrides `DEFAULTS` (block shapes and dot precisions,
    for benchmarks)."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    cfg = {**DEFAULTS, **cfg}
    if cfg["state_bv"] not in (32, 64, 128):
        # BV=16 faulted (illegal address) in the state pass on an H200 with Triton 3.6
        raise ValueError(f"state_bv must be 32, 64 or 128, got {cfg['state_bv']}")
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, A_log=A_log,
                                      dt_bias=dt_bias, use_gate_in_kernel=use_gate_in_kernel)
    out = output_buffer(out, (B, T, H, V), v)
    if not out.is_contiguous():  # the output kernel writes [B * T, H, V] rows
        raise ValueError("out must be contiguous")
    scale = K ** -0.5 if scale is None else scale
    q, k, v = (token_rows(x, B * T) for x in (q, k, v))
    g, beta = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (g, beta))
    total = B * T
    if chunk_layout is None:
        chunk_layout = device_chunk_layout(B, T, cu_seqlens, q.device)
    starts, ends, first, cu = chunk_layout
    NC = starts.numel()
    BK = triton.next_power_of_2(K)
    BVfull = triton.next_power_of_2(V)
    # bf16 dot operands for low-precision inputs; the interpreter (numpy) has no bf16 matmul
    lowp = q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1"
    prec = "tf32" if lowp else "ieee"
    f32 = dict(dtype=torch.float32, device=q.device)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if NC == 0:
        if ht is not None:
            ht.copy_(h0) if h0 is not None else ht.zero_()
        return out, ht
    low = q.dtype if lowp else torch.float32   # what later launches read as dot operands
    lo = dict(dtype=low, device=q.device)
    # chunk bounds: computed in the kernels for B sequences of length T, else read from the layout
    lay = dict(T=T, NCS=triton.cdiv(T, BT), VARLEN=cu_seqlens is not None)
    strides = dict(sq=q.stride(0), sk=k.stride(0))
    pre = dict(BETA_SIGMOID=use_beta_sigmoid_in_kernel, QK_NORM=use_qk_l2norm_in_kernel)
    gc = torch.empty(total, H, K, **f32)
    # what a launch is given for a pointer its flags leave unread: not a live buffer, which would
    # stay allocated as long as the name does (check_kda_args refuses dt_bias without the gate)
    unread = torch.empty(1, **f32)
    a_log = A_log.reshape(-1).contiguous() if use_gate_in_kernel else unread
    bias = dt_bias.reshape(-1).contiguous() if dt_bias is not None else unread
    cbk = min(BK, cfg["cumsum_bk"])
    _cumsum_kernel[(NC, H, triton.cdiv(K, cbk))](
        g, gc, a_log, bias, starts, ends, H=H, K=K, BT=BT, BK=cbk, GATE=use_gate_in_kernel,
        HAS_BIAS=dt_bias is not None, num_warps=cfg["cumsum_warps"], **lay)
    # 1/|q|, 1/|k| per token and head, written by the diagonal kernel (placeholders without l2norm)
    rq, rk = (torch.empty(total, H, **f32) for _ in range(2)) if use_qk_l2norm_in_kernel else (unread, unread)
    Aqk = torch.empty(total, H, BT, **lo)      # row t: its chunk's Aqk[t, :], s <= t only written
    Akkd = torch.empty(total, H, BC, **f32)    # row t: beta*Akk[t, s] of its 16-block, s < t written
    _diag_kernel[(NC * BT, triton.cdiv(H, cfg["diag_bh"]))](
        q, k, gc if use_gate_in_kernel else g, gc, beta, Aqk, Akkd, rq, rk, starts, ends, scale,
        H=H, K=K, BT=BT, BC=BC, BK=BK, BH=cfg["diag_bh"], DECAY_FROM_GC=use_gate_in_kernel,
        num_warps=cfg["diag_warps"], **lay, **strides, **pre)
    Ai = torch.empty(total, H, BT, **lo)       # (I + beta Akk)^-1, lower 16x16 blocks written
    _solve_kernel[(NC, H)](
        q, k, gc, beta, Aqk, Akkd, Ai, rq, rk, starts, ends, scale,
        H=H, K=K, BT=BT, BC=BC, BK=min(BK, cfg["solve_bk"]), PREC=prec,
        SOLVE_PREC=cfg["solve_prec"] if lowp else "ieee", num_warps=cfg["solve_warps"], **lay, **strides, **pre)
    del Akkd
    qg = torch.empty(total, H, K, **lo)
    kend = torch.empty(total, H, K, **lo)
    w = torch.empty(total, H, K, **lo)
    u = torch.empty(total, H, V, **lo)
    gexp = torch.empty(NC, H, K, **f32)
    _wu_kernel[(NC, H)](
        q, k, v, gc, beta, Ai, qg, kend, w, u, gexp, rq, rk, starts, ends, scale, sv=v.stride(0),
        H=H, K=K, V=V, BT=BT, BC=BC, BK=min(BK, cfg["wu_bk"]), BV=min(BVfull, cfg["wu_bv"]), LOWP=lowp,
        num_warps=cfg["wu_warps"], num_stages=cfg["wu_stages"], **lay, **strides, **pre)
    del Ai, gc
    # the state entering each chunk; fp32 for fp32 inputs, else the input dtype (as fla does)
    h = torch.empty(NC, H, K, V, **lo)
    sbv = min(BVfull, cfg["state_bv"])
    _state_kernel[(triton.cdiv(V, sbv), N * H)](
        w, u, kend, gexp, h, h0, ht, cu, first,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=sbv, HAS_H0=h0 is not None, STORE_HT=ht is not None,
        # fp32 tiles at 4 stages need more shared memory than an H200 has (239 KB of 227)
        LOWP=lowp, NUM_STAGES=cfg["state_stages"] if lowp else min(cfg["state_stages"], 3), num_warps=4)
    del w, kend
    o = out.view(total, H, V)
    obv = min(BVfull, cfg["out_bv"])
    _output_kernel[(NC, H, triton.cdiv(V, obv))](
        qg, h, Aqk, u, o, rk, starts, ends,
        H=H, K=K, V=V, BT=BT, BK=min(BK, cfg["out_bk"]), BV=obv, LOWP=lowp, num_warps=cfg["out_warps"],
        QK_NORM=use_qk_l2norm_in_kernel, **lay)
    return out, ht
