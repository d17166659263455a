"""vllm-kimi-linear's operators, importable without vLLM (torch and triton only; fla-core optional).

- `kimi_kda.kda`: chunked prefill and recurrent decode of Kimi Delta Attention, and its gate.
- `kimi_kda.conv`: the short causal convolution, for prefill and for one-token updates on slots.
"""
from .conv import causal_conv1d, causal_conv1d_update
from .kda import chunk_kda, fused_recurrent_kda, kda_gate

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate", "causal_conv1d", "causal_conv1d_update"]
