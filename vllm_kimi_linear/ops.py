"""The operators the model layers call, re-exported from `kernels` (importing this imports no vLLM)."""
from kimi_kda import causal_conv1d, causal_conv1d_update, chunk_kda, fused_recurrent_kda, kda_gate
from kimi_kda.kda.args import chunk_layout_host

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate", "causal_conv1d", "causal_conv1d_update",
           "chunk_layout_host"]
