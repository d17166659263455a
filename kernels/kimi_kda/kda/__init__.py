"""KDA operators: one entry point per operator, backend chosen by device.

Backends: "torch" (PyTorch chunked algorithm; any device, the CPU path), "triton" (our kernels;
CUDA, or CPU under TRITON_INTERPRET=1 for tests), "fla" (fla-core's Triton kernels, CUDA, if
installed). `backend=None` reads $KDA_BACKEND, else picks "triton" on CUDA and "torch" elsewhere.
"""
from __future__ import annotations

import torch

from ..backend import resolve_backend as pick_backend
from .args import check_kda_args, output_buffer
from .cpu import chunk_kda_torch, fused_recurrent_kda_torch
from .gate import kda_gate

BACKENDS = ("torch", "triton", "fla")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    backend = pick_backend(device, backend, "KDA_BACKEND", BACKENDS, "KDA")
    if backend == "fla" and device.type != "cuda":
        raise ValueError("backend='fla' runs on CUDA only; use 'torch' on CPU")
    return backend


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, backend=None, chunk_layout=None,
              use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None,
              out=None):
    """Chunked KDA prefill. q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g is the
    per-channel log-decay (<= 0). States are [N, H, K, V] float32; with `cu_seqlens` [N + 1],
    B == 1 and N sequences are packed along T. Returns (o [B, T, H, V], final_state or None).
    q, k, v may be bf16/fp16 (computed in fp32 inside, dots on bf16 operands as fla does).
    `chunk_layout` (Triton backend): `triton_chunk.chunk_layout_host` of the batch as device
    int32 tensors, built where the host knows the lengths, so the call does not synchronise.

    Pre-processing in the kernels, fla-core's keywords and formulas:
    `use_gate_in_kernel`: g is the raw gate projection f, and g = -exp(A_log) * softplus(f + dt_bias)
    (A_log [H], dt_bias [H*K] or None); `use_beta_sigmoid_in_kernel`: beta holds logits, and
    beta = sigmoid(beta); `use_qk_l2norm_in_kernel`: q and k are l2-normalised over K.

    `out` [B, T, H, V], contiguous, v's dtype: where the output goes (returned); the Triton
    kernel writes it directly (the layer's buffer: no copy)."""
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)
    pre = dict(use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
               A_log=A_log, dt_bias=dt_bias)
    be = resolve_backend(q.device, backend)
    if be == "triton":
        from .triton_chunk import chunk_kda_triton
        return chunk_kda_triton(*args, chunk_layout=chunk_layout, out=out, **pre)
    if be == "fla":
        from .fla_backend import chunk_kda_fla
        o, state = chunk_kda_fla(*args, **pre)
    else:
        o, state = chunk_kda_torch(*args, **pre)
    return _into(out, o), state


def _into(out, o):
    """`o`, or `o` copied into the caller's `out` (the backends that allocate their own output)."""
    return o if out is None else output_buffer(out, o.shape, o).copy_(o)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, cu_seqlens=None, ssm_state_indices=None,
                        backend=None, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                        A_log=None, dt_bias=None, out=None):
    """Token-by-token KDA, same arguments as `chunk_kda` (gate and beta sigmoid in the kernel
    too). `out` [B, T, H, V]: where the output goes (returned); the Triton kernel writes it
    directly and reads q/k/v/beta through their token stride, so views of a layer's packed
    projections cost no copies. With `ssm_state_indices` [N],
    `initial_state` is a state pool [num_slots, H, K, V]: row ssm_state_indices[n] is sequence n's
    state, read and updated in place; a negative index marks a padded entry, which is skipped
    (its output is 0 and no row is touched). Returns (o, pool) in that case."""
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
            cu_seqlens, ssm_state_indices)
    pre = dict(use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
               A_log=A_log, dt_bias=dt_bias)
    be = resolve_backend(q.device, backend)
    if be == "triton":
        from .triton_recurrent import fused_recurrent_kda_triton
        return fused_recurrent_kda_triton(*args, out=out, **pre)
    if be == "fla":
        from .fla_backend import fused_recurrent_kda_fla
        o, state = fused_recurrent_kda_fla(*args, **pre)
    else:
        o, state = fused_recurrent_kda_torch(*args, **pre)
    return _into(out, o), state


__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate", "resolve_backend", "check_kda_args", "BACKENDS"]
