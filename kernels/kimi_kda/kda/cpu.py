"""KDA in plain PyTorch: the chunked prefill and the token-by-token recurrence (the CPU path).

Both run on any device; on CUDA the Triton kernels are preferred (see `kimi_kda.kda`).

Chunked form, per chunk of C tokens and head (gc = cumulative log-decay inside the chunk, so
exp(gc_t - gc_s) is the decay from token s to token t, <= 1 for s <= t):

    Akk[t, s] = beta_t * sum_d k_td k_sd exp(gc_td - gc_sd)        s < t
    Aqk[t, s] =          sum_d q_td k_sd exp(gc_td - gc_sd)        s <= t   (q already scaled)
    (I + Akk) [u | w] = [beta * v | beta * exp(gc) * k]           (the UT transform)
    v_new = u - w S0
    o     = q exp(gc) S0 + Aqk v_new
    S_end = exp(gc_C) * S0 + kendᵀ v_new,  kend = k exp(gc_C - gc)

Everything but the last three lines is independent per chunk and runs as batched matmuls over
all chunks at once; only the state pass is sequential. Every exponent is <= 0: the decay matrix is
factored through a reference token at the start of each 16-token sub-chunk (off-diagonal
sub-blocks) and evaluated pairwise inside each sub-chunk, so per-step log-decays down to -30 (and
far below) neither overflow nor lose precision. Nothing is divided by a cumulative decay.
"""
from __future__ import annotations

import torch

from .args import ChunkLayout, check_kda_args, l2norm, seq_bounds
from .gate import kda_gate

CHUNK = 64
LEAF = 4
# chunks per intra-chunk batch, sized by the [n, H, C, 4, K]-element leaf temporaries
_INTRA_BATCH_ELEMS = 1 << 21  # ~2M elements: the per-batch temporaries stay in cache


def _flatten_inputs(q, k, v, g, beta, scale, use_qk_l2norm, A_log=None, dt_bias=None, beta_sigmoid=False):
    """[B, T, ...] -> [B*T, ...] in the compute dtype (float64 for float64 inputs, whose states are
    then float64 too; float32 otherwise), with q and k normalised if asked and q scaled. With
    A_log, g is the raw gate projection and the gate is applied (in the compute dtype: the one
    upcast this path makes anyway); with beta_sigmoid, beta holds logits."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.flatten(0, 1).to(dt) for x in (q, k, v, g, beta))
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias, output_dtype=dt)
    if beta_sigmoid:
        beta = beta.sigmoid()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k, v, g, beta


def _leaf_products(q, k, gc):
    """Small diagonal blocks, evaluated per sub-diagonal d = t - s (slices, no gathers)."""
    L = k.shape[-2]
    Aqk = q.new_zeros(*k.shape[:-1], L)
    Akk = q.new_zeros(*k.shape[:-1], L)
    torch.diagonal(Aqk, 0, -2, -1).copy_((q * k).sum(-1))
    for d in range(1, L):
        dec = (gc[..., d:, :] - gc[..., :L - d, :]).exp_().mul_(k[..., :L - d, :])
        torch.diagonal(Aqk, -d, -2, -1).copy_((q[..., d:, :] * dec).sum(-1))
        torch.diagonal(Akk, -d, -2, -1).copy_((k[..., d:, :] * dec).sum(-1))
    return Aqk, Akk


def _decay_products(q, k, gc):
    """Aqk (s <= t) and Akk (s < t) for blocks [..., L, K]; every exponent is <= 0.

    The block is cut into 4 sub-blocks: sub-block i against everything before it is one matmul
    of factors taken relative to the first token of sub-block i (both exponents <= 0); the
    diagonal sub-blocks recurse, down to 4x4 blocks evaluated pairwise.
    """
    *batch, L, K = k.shape
    if L <= LEAF:
        return _leaf_products(q, k, gc)
    n = L // 4
    Aqk = q.new_zeros(*batch, L, L)
    Akk = q.new_zeros(*batch, L, L)
    split = lambda x: x.unflatten(-2, (4, n))                        # noqa: E731
    dq, dk = _decay_products(split(q), split(k), split(gc))          # [..., 4, n, n]
    for i in range(4):
        r = slice(i * n, (i + 1) * n)
        Aqk[..., r, r] = dq[..., i, :, :]
        Akk[..., r, r] = dk[..., i, :, :]
        if i == 0:
            continue
        g0 = gc[..., i * n: i * n + 1, :]
        right = k[..., : i * n, :] * (g0 - gc[..., : i * n, :]).exp()
        left = (gc[..., r, :] - g0).exp()
        right_t = right.transpose(-1, -2)
        Aqk[..., r, : i * n] = (q[..., r, :] * left) @ right_t
        Akk[..., r, : i * n] = (k[..., r, :] * left) @ right_t
    return Aqk, Akk


def _intra_chunk(q, k, v, g, beta):
    """Per-chunk terms for chunks [n, H, C, *]: Aqk, [w; q exp(gc)], u, kend, exp(gc_C)."""
    gc = g.cumsum(-2)
    Aqk, Akk = _decay_products(q, k, gc)
    C = q.shape[-2]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    decay = gc.exp()
    kb = (decay * k).mul_(beta.unsqueeze(-1))
    # (I + Akk)^-1 by one triangular solve against I, then a plain matmul: far cheaper on CPU
    # than solving against the 2x wider right-hand side directly
    inv = torch.linalg.solve_triangular(torch.addcmul(eye, Akk, beta.unsqueeze(-1)), eye.expand_as(Akk),
                                        upper=False, unitriangular=True)
    u = inv @ (v * beta.unsqueeze(-1))
    g_last = gc[..., -1:, :]
    # w and q*exp(gc) both multiply the chunk's incoming state: stack them for one matmul
    wq = torch.cat([inv @ kb, decay.mul_(q)], dim=-2)
    kend_t = (g_last - gc).exp_().mul_(k).transpose(-1, -2).contiguous()
    return Aqk, wq, u, kend_t, g_last.transpose(-1, -2).exp()


def chunk_kda_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_size: int = CHUNK, *,
                    use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None):
    """`use_gate_in_kernel` / `use_beta_sigmoid_in_kernel`: g and beta are the raw projections
    (see `kimi_kda.kda.chunk_kda`); here the gate and the sigmoid simply run first."""
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, A_log=A_log,
                                      dt_bias=dt_bias, use_gate_in_kernel=use_gate_in_kernel)
    if chunk_size not in (16, 64, 256):
        raise ValueError(f"chunk_size must be 16, 64 or 256, got {chunk_size}")
    out_dtype = v.dtype
    q, k, v, g, beta = _flatten_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel,
                                       A_log, dt_bias,
                                       use_beta_sigmoid_in_kernel)
    dt = q.dtype

    total = B * T
    layout = ChunkLayout.build(seq_bounds(B, T, cu_seqlens), chunk_size, total, q.device)
    # [NC, C, H, D] -> [NC, H, C, D]
    qc, kc, vc, gcx, bc = (layout.gather(x).transpose(1, 2).contiguous() for x in (q, k, v, g, beta))
    NC = qc.shape[0]

    per_chunk = H * chunk_size * LEAF * K
    step = max(1, _INTRA_BATCH_ELEMS // per_chunk)
    S = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dt).clone()
    lens = {len(c) for c in layout.seq_chunks}
    if len(lens) == 1:
        o_chunks = _fused_scan(lens.pop(), N, step, S, qc, kc, vc, gcx, bc)
    else:
        parts = [_intra_chunk(qc[i:i + step], kc[i:i + step], vc[i:i + step], gcx[i:i + step], bc[i:i + step])
                 for i in range(0, NC, step)]
        terms = [torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts)]
        o_chunks = _varlen_scan(layout.seq_chunks, S, *terms)

    o = layout.scatter(o_chunks.transpose(1, 2), total).reshape(B, T, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _scan_step(S, Aqk, wq, u, kend_t, g_last_exp):
    """One chunk of every sequence in S [n, H, K, V]: returns its outputs, updates S in place."""
    C = u.shape[-2]
    ws = wq @ S
    v_new = u - ws[..., :C, :]
    S.mul_(g_last_exp).add_(kend_t @ v_new)
    return ws[..., C:, :] + Aqk @ v_new


def _fused_scan(n, N, step, S, qc, kc, vc, gcx, bc):
    """Equal-length sequences (n chunks each): walk chunk positions in batches, computing each
    batch's intra-chunk terms and consuming them at once, so nothing is stored for all chunks."""
    if N > 1:  # position-major order: chunk j of every sequence is one contiguous block
        perm = torch.arange(N * n, device=qc.device).view(N, n).t().reshape(-1)
        qc, kc, vc, gcx, bc = (x[perm] for x in (qc, kc, vc, gcx, bc))
    o = torch.empty(*vc.shape[:-2], vc.shape[-2], vc.shape[-1], dtype=vc.dtype, device=vc.device)
    per = max(1, step // N)
    for j0 in range(0, n, per):
        rows = slice(j0 * N, min(n, j0 + per) * N)
        terms = _intra_chunk(qc[rows], kc[rows], vc[rows], gcx[rows], bc[rows])
        for jj in range(0, rows.stop - rows.start, N):
            o[rows.start + jj: rows.start + jj + N] = _scan_step(S, *(t[jj:jj + N] for t in terms))
    if N > 1:
        out = torch.empty_like(o)
        out[perm] = o
        o = out
    return o


def _varlen_scan(seq_chunks, S, Aqk, wq, u, kend_t, g_last_exp):
    """The sequential pass over sequences of different lengths: chunk j of every sequence that
    has one, batched. Updates S [N, H, K, V] in place; returns every chunk's outputs."""
    o_chunks = torch.empty_like(u)
    for j in range(max(len(c) for c in seq_chunks)):
        seqs = [i for i, c in enumerate(seq_chunks) if len(c) > j]
        ids = torch.tensor([seq_chunks[i][j] for i in seqs], device=S.device)
        sel = torch.tensor(seqs, device=S.device)
        s = S[sel]
        o_chunks[ids] = _scan_step(s, Aqk[ids], wq[ids], u[ids], kend_t[ids], g_last_exp[ids])
        S[sel] = s
    return o_chunks


def fused_recurrent_kda_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                              use_qk_l2norm_in_kernel=False, cu_seqlens=None, ssm_state_indices=None,
                              use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None,
                              dt_bias=None):
    """Token-by-token recurrence. With `ssm_state_indices`, `initial_state` is a state pool whose
    named rows are read and updated in place (negative index: padded entry, skipped, output 0).
    `use_gate_in_kernel` / `use_beta_sigmoid_in_kernel`: as `chunk_kda_torch`."""
    B, T, H, K, V, N = check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, ssm_state_indices,
                                      A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=use_gate_in_kernel)
    out_dtype = v.dtype
    q, k, v, g, beta = _flatten_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel,
                                       A_log, dt_bias,
                                       use_beta_sigmoid_in_kernel)
    dt = q.dtype
    bounds = seq_bounds(B, T, cu_seqlens)
    o = v.new_zeros(B * T, H, V)   # compute dtype; cast on return

    if ssm_state_indices is not None:
        live = [i for i, s in enumerate(ssm_state_indices.tolist()) if s >= 0]
        slots = ssm_state_indices[live].long()
        S = initial_state[slots].to(dt)
    else:
        live = list(range(N))
        S = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dt).clone()

    lens = [bounds[i][1] - bounds[i][0] for i in live]
    for t in range(max(lens, default=0)):
        act = [j for j, n in enumerate(lens) if n > t]
        rows = torch.tensor([bounds[live[j]][0] + t for j in act], device=q.device)
        sel = torch.tensor(act, device=q.device)
        s = S[sel] * g[rows].exp().unsqueeze(-1)
        k_t = k[rows]
        v_new = v[rows] - (k_t.unsqueeze(-1) * s).sum(-2)
        s = s + (beta[rows].unsqueeze(-1) * k_t).unsqueeze(-1) * v_new.unsqueeze(-2)
        o[rows] = (q[rows].unsqueeze(-1) * s).sum(-2)
        S[sel] = s

    o = o.reshape(B, T, H, V).to(out_dtype)
    if ssm_state_indices is not None:
        if live:
            initial_state[slots] = S.to(initial_state.dtype)
        return o, initial_state
    return o, (S if output_final_state else None)
