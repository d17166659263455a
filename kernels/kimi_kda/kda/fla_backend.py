"""fla-core's Triton kernels behind our argument conventions (CUDA only, optional dependency).

Selected with backend="fla" so benchmarks and GPU checks can run both kernels side by side.
"""
from __future__ import annotations

from .args import check_kda_args


def _fla():
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("backend='fla' needs fla-core: pip install 'vllm-kimi-linear[cuda]'") from e
    return chunk_kda, fused_recurrent_kda


def chunk_kda_fla(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, use_gate_in_kernel=False,
                  use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None):
    check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, A_log=A_log, dt_bias=dt_bias,
                   use_gate_in_kernel=use_gate_in_kernel)
    chunk_kda, _ = _fla()
    # fla reads A_log and dt_bias from **kwargs, and only when use_gate_in_kernel is set
    gate = dict(A_log=A_log, dt_bias=dt_bias) if use_gate_in_kernel else {}
    return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state,
                     use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                     use_gate_in_kernel=use_gate_in_kernel,
                     use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, **gate)


def fused_recurrent_kda_fla(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                            use_qk_l2norm_in_kernel=False, cu_seqlens=None, ssm_state_indices=None, *,
                            use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, A_log=None,
                            dt_bias=None):
    check_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, ssm_state_indices, A_log=A_log,
                   dt_bias=dt_bias, use_gate_in_kernel=use_gate_in_kernel)
    if use_gate_in_kernel:  # fla's recurrent kernel takes the gate made: make it first
        from .gate import kda_gate
        g = kda_gate(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
    if ssm_state_indices is not None and bool((ssm_state_indices < 0).any()):
        # fla reads slot -1 as a real row (vLLM #28436); only our kernels skip padded entries
        raise ValueError("backend='fla' cannot skip padded (negative) slot indices; use backend='triton'")
    _, fused_recurrent_kda = _fla()
    o, s = fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state,
                               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                               ssm_state_indices=ssm_state_indices, inplace_final_state=True)
    return (o, initial_state) if ssm_state_indices is not None else (o, s)
