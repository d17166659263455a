"""The KDA (Kimi Delta Attention) layer, as a vLLM Mamba-style layer with per-request state.

This module owns one KDA layer: its projections (tensor-parallel by head), its checkpoint-named
parameters and loaders, the state contract with vLLM (conv state + fp32 recurrent state per
request slot, mamba_type GDN_ATTN so vLLM builds GDNAttentionMetadata for it), and the forward
over a batch of decodes followed by prefills, using our operators (vllm_kimi_linear.ops).
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (ColumnParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (MambaStateDtypeCalculator,
                                                          MambaStateShapeCalculator,
                                                          is_conv_state_dim_first)
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..config import KimiLinearDims, model_dims
from ..ops import (causal_conv1d, causal_conv1d_update, chunk_kda, fused_recurrent_kda, kda_gate)


def kda_state_shape(vllm_config: VllmConfig):
    """(conv state shape, recurrent state shape) per slot; the model classmethod uses it too,
    so the layer's pages and vLLM's block-size alignment always agree."""
    kda = model_dims(vllm_config).kda
    return MambaStateShapeCalculator.kda_state_shape(
        vllm_config.parallel_config.tensor_parallel_size, kda.num_heads, kda.head_dim,
        conv_kernel_size=kda.short_conv_kernel_size)


def kda_state_dtype(vllm_config: VllmConfig):
    cc = vllm_config.cache_config
    return MambaStateDtypeCalculator.kda_state_dtype(
        vllm_config.model_config.dtype, cc.mamba_cache_dtype, cc.mamba_ssm_cache_dtype)


def _sharded_loader(dim: int, reshape=None):
    """Loads the TP rank's slice along `dim` (after an optional reshape of the checkpoint tensor)."""
    def load(param: nn.Parameter, w: torch.Tensor) -> None:
        if reshape is not None:
            w = reshape(w)
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        size = w.shape[dim] // tp
        param.data.copy_(w.narrow(dim, rank * size, size))
    return load


class ConvWeight(nn.Module):
    """Holds a depthwise conv weight as a plain [dim/tp, K] parameter (checkpoint [dim, 1, K]).
    Not a vLLM Linear on purpose: on CPU those get repacked (weight removed) after loading."""

    def __init__(self, dim: int, kernel: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, kernel, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": _sharded_loader(0, lambda w: w.reshape(w.shape[0], -1))})


class KimiDeltaAttention(nn.Module, MambaBase):
    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.vllm_config, self.prefix = vllm_config, prefix
        hid, H, D, K = dims.hidden_size, dims.kda.num_heads, dims.kda.head_dim, dims.kda.short_conv_kernel_size
        self.heads, self.head_dim, self.eps = H // tp, D, dims.rms_norm_eps
        HD = self.heads * D
        dtype = vllm_config.model_config.dtype

        def col(i, o, name):  # sharded by head along the output
            return ColumnParallelLinear(i, o, bias=False, prefix=f"{prefix}.{name}")

        def rep(i, o, name):  # low-rank down projections: small, replicated on every rank
            return ReplicatedLinear(i, o, bias=False, prefix=f"{prefix}.{name}")

        self.q_proj, self.k_proj, self.v_proj = (col(hid, H * D, f"{c}_proj") for c in "qkv")
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (ConvWeight(HD, K, dtype) for _ in range(3))
        self.f_a_proj, self.f_b_proj = rep(hid, D, "f_a_proj"), col(D, H * D, "f_b_proj")
        self.g_a_proj, self.g_b_proj = rep(hid, D, "g_a_proj"), col(D, H * D, "g_b_proj")
        self.b_proj = col(hid, H, "b_proj")
        # A_log [1,1,H,1] and dt_bias [H*D] stay fp32 (the gate's exp/softplus are sensitive).
        self.A_log = nn.Parameter(torch.empty(self.heads, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.A_log, {"weight_loader": _sharded_loader(0, lambda w: w.reshape(-1))})
        self.dt_bias = nn.Parameter(torch.empty(HD, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.dt_bias, {"weight_loader": _sharded_loader(0)})
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(D, dtype=dtype), requires_grad=False)
        self.o_proj = RowParallelLinear(H * D, hid, bias=False, input_is_parallel=True,
                                        prefix=f"{prefix}.o_proj")
        # vLLM finds the layer (for its state pages and metadata) by prefix.
        cc = vllm_config.compilation_config
        if prefix in cc.static_forward_context:
            raise ValueError(f"duplicate layer name {prefix}")
        cc.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        # Decorated here, not at import: vLLM turns breakable CUDA graphs on (an environment
        # variable) while it builds the config, after this module may have been imported.
        self._run_core = eager_break_during_capture(self._core)

    # ---- vLLM state contract
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN

    def get_state_shape(self):
        return kda_state_shape(self.vllm_config)

    def get_state_dtype(self):
        return kda_state_dtype(self.vllm_config)

    def get_attn_backend(self):
        # vLLM's GDN metadata plus the prefill chunk layout, built on the host each step
        from ..kda_metadata import KDAAttentionBackend
        return KDAAttentionBackend

    # ---- forward
    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        T, H, D = hidden_states.shape[0], self.heads, self.head_dim
        qkv = torch.cat([self.q_proj(hidden_states)[0], self.k_proj(hidden_states)[0],
                         self.v_proj(hidden_states)[0]], dim=-1).float()  # KDA math in fp32
        # shaped [T, H, D] explicitly: kda_gate would misread a flat [T, H*D] when T == H
        f = self.f_b_proj(self.f_a_proj(hidden_states)[0])[0].view(T, H, D)
        g = kda_gate(f, self.A_log, self.dt_bias)
        beta = torch.sigmoid(self.b_proj(hidden_states)[0].float())
        core = torch.zeros(T, H, D, dtype=torch.float32, device=hidden_states.device)
        self._run_core(qkv, g, beta, core)
        gate = torch.sigmoid(self.g_b_proj(self.g_a_proj(hidden_states)[0])[0].float()).view(T, H, D)
        o = core * torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm.weight.float()
        o = (o * gate).to(hidden_states.dtype).reshape(T, H * D)
        return self.o_proj(o)[0]

    def _core(self, qkv, g, beta, out) -> None:
        """The recurrent part; writes `out` [T, H, D] fp32 in place. Rows past the batch's real
        tokens (padding), and every row in profile/dummy runs (no metadata), stay zero.

        CUDA graphs: vLLM captures the whole forward. In piecewise (breakable) graphs this
        function is an eager break (`_run_core`): it runs at every replay with that step's
        metadata, so Python may branch on the metadata's host ints. In FULL decode graphs it is
        captured like the rest: decode batches are padded with slot 0 (vLLM's null block), so
        nothing here may read a device tensor on the host."""
        md = get_forward_context().attn_metadata
        m = md.get(self.prefix) if isinstance(md, dict) else None
        if m is None:
            return
        H, D = self.heads, self.head_dim
        conv_state, ssm_state = self.kv_cache
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)  # (slots, 3HD, K-1) view for our conv ops
        w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
        idx = m.non_spec_state_indices_tensor
        nd, ndt, npf, npt = m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens

        def qkvgb(x, gg, bb, shape):
            q, k, v = x.split(H * D, dim=-1)
            return (*(t.reshape(*shape, H, D) for t in (q, k, v)),
                    gg.reshape(*shape, H, D), bb.reshape(*shape, H))

        # Batches are ordered decodes first, then prefills (GDN metadata, reorder threshold 1).
        if nd:
            slots = idx[:nd]
            x = causal_conv1d_update(qkv[:ndt], w, conv_state, slots)
            q, k, v, gg, bb = qkvgb(x, g[:ndt], beta[:ndt], (ndt, 1))
            o, _ = fused_recurrent_kda(q, k, v, gg, bb, scale=D ** -0.5, initial_state=ssm_state,
                                       use_qk_l2norm_in_kernel=True, ssm_state_indices=slots)
            out[:ndt] = o.reshape(ndt, H, D).float()
        if npf:
            s, e = ndt, ndt + npt
            slots = idx[nd:nd + npf]
            his = m.has_initial_state[nd:nd + npf]
            layout = m.prefill_layout  # built once per step for every KDA layer (kda_metadata.py)
            cu = layout.cu_seqlens
            x = causal_conv1d(qkv[s:e], w, cu, conv_state, slots, his, seq_of_token=layout.seq_of_token)
            q, k, v, gg, bb = qkvgb(x, g[s:e], beta[s:e], (1, npt))
            # vLLM does not clear a slot on reuse: a new request must start from zeros.
            init = torch.where(his.view(-1, 1, 1, 1), ssm_state[slots.long()].float(), 0.0)
            o, final = chunk_kda(q, k, v, gg, bb, scale=D ** -0.5, initial_state=init,
                                 output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                                 chunk_layout=layout.chunk_layout)
            ssm_state[slots.long()] = final.to(ssm_state.dtype)
            out[s:e] = o.reshape(npt, H, D).float()
