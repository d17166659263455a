"""The KDA (Kimi Delta Attention) layer, as a vLLM Mamba-style layer with per-request state.

This module owns one KDA layer: its projections (tensor-parallel by head), its checkpoint-named
parameters and loaders, the state contract with vLLM (conv state + fp32 recurrent state per
request slot, mamba_type GDN_ATTN so vLLM builds GDNAttentionMetadata for it), and the forward
over a batch of decodes followed by prefills, using our operators (vllm_kimi_linear.ops).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (MambaStateDtypeCalculator,
                                                          MambaStateShapeCalculator,
                                                          is_conv_state_dim_first)
from vllm.model_executor.utils import set_weight_attrs
from vllm.third_party.flash_linear_attention.ops.kda import FusedRMSNormGated
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from vllm.logger import init_logger

from ..config import KDADims, KimiLinearDims, model_dims
from ..ops import causal_conv1d, causal_conv1d_update, chunk_kda, fused_recurrent_kda


logger = init_logger("vllm.kimi_linear")  # under vLLM's logger: printed with its lines


def kda_state_shape(vllm_config: VllmConfig, kda: KDADims | None = None):
    """(conv state shape, recurrent state shape) per slot; the model classmethod uses it too,
    so the layer's pages and vLLM's block-size alignment always agree. `kda`: the dimensions,
    when the caller has them (else read from the model's config)."""
    kda = kda or model_dims(vllm_config).kda
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
    """The q, k and v depthwise conv weights as one plain [3 * dim/tp, K] parameter (checkpoint:
    three [dim, 1, K] tensors, shards 0, 1, 2), so each step reads one weight, not a concatenation.
    Not a vLLM Linear on purpose: on CPU those get repacked (weight removed) after loading."""

    def __init__(self, dim: int, kernel: int, dtype: torch.dtype):
        super().__init__()
        self.dim = dim // get_tensor_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(3 * self.dim, kernel, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.load})

    def load(self, param: nn.Parameter, w: torch.Tensor, shard_id: int) -> None:
        rank = get_tensor_model_parallel_rank()
        w = w.reshape(w.shape[0], -1).narrow(0, rank * self.dim, self.dim)
        param.data[shard_id * self.dim:(shard_id + 1) * self.dim].copy_(w)


class MergedInputProjection(MergedColumnParallelLinear):
    """Every projection of the layer's input in one GEMM: q, k, v, b sharded by head, and the
    low-rank f_a, g_a replicated. A replicated shard reserves its full size on every rank
    (declared as size x tp, so the parent's per-rank arithmetic gives `size`) and is loaded as
    rank 0 would load it, i.e. whole. (vLLM's in-tree Kimi layer merges f_a the same way.)"""

    def __init__(self, hidden: int, sharded: list[int], replicated: list[int], tp: int,
                 quant_config, prefix: str):
        self.replicated_ids = set(range(len(sharded), len(sharded) + len(replicated)))
        super().__init__(hidden, sharded + [r * tp for r in replicated], bias=False,
                         quant_config=quant_config, prefix=prefix)

    def _as_rank_0(self, load, param, loaded_weight, loaded_shard_id):
        # the v1 loader reads the layer's tp_rank, the v2 loader (vLLM parameters) the parameter's
        ranks = self.tp_rank, getattr(param, "tp_rank", None)
        if loaded_shard_id in self.replicated_ids:
            self.tp_rank = 0
            if ranks[1] is not None:
                param.tp_rank = 0
        try:
            load(param, loaded_weight, loaded_shard_id)
        finally:
            self.tp_rank = ranks[0]
            if ranks[1] is not None:
                param.tp_rank = ranks[1]

    def weight_loader(self, param, loaded_weight, loaded_shard_id=None):
        self._as_rank_0(super().weight_loader, param, loaded_weight, loaded_shard_id)

    def weight_loader_v2(self, param, loaded_weight, loaded_shard_id=None):
        self._as_rank_0(super().weight_loader_v2, param, loaded_weight, loaded_shard_id)


def kda_packed_modules(quantized: bool) -> dict[str, list[str]]:
    """Our merged module -> the checkpoint modules it holds, in shard order. Unquantized, b_proj
    rides in the one input GEMM; quantized, it is its own layer: block-quantized weights need
    every merged (or TP-split) shard to be a whole number of 128-row blocks, and b_proj has one
    row per head (quantizers leave it unquantized, as Qwen3-Next's FP8 leaves its in_proj_ba)."""
    q_k_v = ["q_proj", "k_proj", "v_proj"]
    inputs = q_k_v + ([] if quantized else ["b_proj"]) + ["f_a_proj", "g_a_proj"]
    return {"in_proj": inputs, "qkv_conv1d": ["q_conv1d", "k_conv1d", "v_conv1d"]}


class KimiDeltaAttention(nn.Module, MambaBase):
    _profiled = False  # the profile-run prefill ran in this process (_profile_prefill)

    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        quant = vllm_config.quant_config
        self.vllm_config, self.prefix, self.dims = vllm_config, prefix, dims.kda
        hid, H, D, K = dims.hidden_size, dims.kda.num_heads, dims.kda.head_dim, dims.kda.short_conv_kernel_size
        self.heads, self.head_dim = H // tp, D
        HD = self.heads * D
        self.packed_modules = kda_packed_modules(quantized=quant is not None)
        if quant is None:
            self.split = [3 * HD, self.heads, D, D]  # this rank's q|k|v (the conv's input), b, f_a, g_a
            self.in_proj = MergedInputProjection(hid, [H * D] * 3 + [H], [D, D], tp, None,
                                                 f"{prefix}.in_proj")
            self.b_proj = None
        else:
            self.split = [3 * HD, D, D]
            self.in_proj = MergedInputProjection(hid, [H * D] * 3, [D, D], tp, quant, f"{prefix}.in_proj")
            self.b_proj = ColumnParallelLinear(hid, H, bias=False, quant_config=quant,
                                               prefix=f"{prefix}.b_proj")
        self.qkv_conv1d = ConvWeight(H * D, K, vllm_config.model_config.dtype)
        self.f_b_proj = ColumnParallelLinear(D, H * D, bias=False, quant_config=quant,
                                             prefix=f"{prefix}.f_b_proj")
        self.g_b_proj = ColumnParallelLinear(D, H * D, bias=False, quant_config=quant,
                                             prefix=f"{prefix}.g_b_proj")
        # A_log [1,1,H,1] and dt_bias [H*D] stay fp32 (the gate's exp/softplus are sensitive).
        self.A_log = nn.Parameter(torch.empty(self.heads, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.A_log, {"weight_loader": _sharded_loader(0, lambda w: w.reshape(-1))})
        self.dt_bias = nn.Parameter(torch.empty(HD, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.dt_bias, {"weight_loader": _sharded_loader(0)})
        # vLLM's fused RMSNorm x sigmoid(gate) (Triton on CUDA, PyTorch elsewhere); weight o_norm.weight
        self.o_norm = FusedRMSNormGated(D, eps=dims.rms_norm_eps, activation="sigmoid")
        self.o_proj = RowParallelLinear(H * D, hid, bias=False, input_is_parallel=True,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
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
        return kda_state_shape(self.vllm_config, self.dims)

    def get_state_dtype(self):
        return kda_state_dtype(self.vllm_config)

    def get_attn_backend(self):
        # vLLM's GDN metadata plus the prefill chunk layout, built on the host each step
        from ..kda_metadata import KDAAttentionBackend
        return KDAAttentionBackend

    # ---- forward
    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        T, H, D = hidden_states.shape[0], self.heads, self.head_dim
        if self.b_proj is None:
            qkv, b, f_a, g_a = self.in_proj(hidden_states)[0].split(self.split, dim=-1)
        else:
            qkv, f_a, g_a = self.in_proj(hidden_states)[0].split(self.split, dim=-1)
            b = self.b_proj(hidden_states)[0]
        # shaped [T, H, D] explicitly: the gate would misread a flat [T, H*D] when T == H
        f = self.f_b_proj(f_a)[0].view(T, H, D)  # raw: the gate is applied inside the kernels
        # not zeros: the core writes every row (a fill kernel a layer a step saved)
        core = torch.empty(T, H, D, dtype=hidden_states.dtype, device=hidden_states.device)
        self._run_core(qkv, f, b, core)
        gate = self.g_b_proj(g_a)[0].view(T, H, D)
        return self.o_proj(self.o_norm(core, gate).reshape(T, H * D))[0]

    def _core(self, qkv, f, b, out) -> None:
        """The recurrent part: conv, gate (from the raw `f`), beta (from the logits `b`) and KDA;
        writes every row of `out` [T, H, D] (uninitialised on entry): rows past the batch's real
        tokens (padding), and every row in profile/dummy runs (no metadata), are zeroed. Decode
        rows are all the kernel's, padded ones included (vLLM pads FULL-graph decode batches with
        the null slot 0, which the kernel runs like any other; a negative slot writes zeros).

        CUDA graphs: vLLM captures the whole forward. In piecewise (breakable) graphs this
        function is an eager break (`_run_core`): it runs at every replay with that step's
        metadata, so Python may branch on the metadata's host ints. In FULL decode graphs it is
        captured like the rest: decode batches are padded with slot 0 (vLLM's null block), so
        nothing here may read a device tensor on the host."""
        md = get_forward_context().attn_metadata
        m = md.get(self.prefix) if isinstance(md, dict) else None
        if m is None:
            out.zero_()
            self._profile_prefill(qkv, f, b)
            return
        H, D = self.heads, self.head_dim
        conv_state, ssm_state = self._state_views(*self.kv_cache)
        w = self.qkv_conv1d.weight
        idx = m.non_spec_state_indices_tensor
        nd, ndt, npf, npt = m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens

        # Batches are ordered decodes first, then prefills (GDN metadata, reorder threshold 1).
        if nd:
            slots = idx[:nd]
            q, k, v = self._heads(causal_conv1d_update(qkv[:ndt], w, conv_state, slots), (ndt, 1))
            # q/k/v/b are strided views and the output goes straight into `out`: no copies
            fused_recurrent_kda(q, k, v, f[:ndt].reshape(ndt, 1, H, D), b[:ndt].reshape(ndt, 1, H),
                                scale=D ** -0.5, initial_state=ssm_state,
                                use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                use_beta_sigmoid_in_kernel=True, A_log=self.A_log,
                                dt_bias=self.dt_bias, ssm_state_indices=slots,
                                out=out[:ndt].view(ndt, 1, H, D))
        if npf:
            s, e = ndt, ndt + npt
            self._prefill(qkv[s:e], f[s:e], b[s:e], out[s:e], conv_state, ssm_state, idx[nd:nd + npf],
                          m.has_initial_state[nd:nd + npf], m.prefill_layout)
        if ndt + npt < out.shape[0]:  # padding of a piecewise-graph batch (host ints: eager here)
            out[ndt + npt:].zero_()

    def _heads(self, x, shape):
        """q, k, v [*shape, H, D]: views of the conv output's three column blocks (no copies)."""
        H, D = self.heads, self.head_dim
        return (t.reshape(*shape, H, D) for t in x.split(H * D, dim=-1))

    @staticmethod
    def _state_views(conv_state, ssm_state):
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)  # (slots, 3HD, K-1) view for our conv ops
        return conv_state, ssm_state

    def _prefill(self, qkv, f, b, out, conv_state, ssm_state, slots, has_initial_state, layout) -> None:
        """Packed prefill sequences (bounds in `layout`, built once per step for every KDA layer,
        kda_metadata.py), each from its slot's state where `has_initial_state`, else from zeros;
        writes `out` [T, H, D] and the slots' conv and recurrent states."""
        T, H, D = qkv.shape[0], self.heads, self.head_dim
        cu = layout.cu_seqlens
        x = causal_conv1d(qkv, self.qkv_conv1d.weight, cu, conv_state, slots, has_initial_state,
                          seq_of_token=layout.seq_of_token)
        q, k, v = self._heads(x, (1, T))
        # vLLM does not clear a slot on reuse: a new request must start from zeros.
        init = torch.where(has_initial_state.view(-1, 1, 1, 1), ssm_state[slots.long()].float(), 0.0)
        # `out` is rows of the layer's contiguous buffer: the kernel writes them, no copy
        _, final = chunk_kda(q, k, v, f.reshape(1, T, H, D), b.reshape(1, T, H),
                             scale=D ** -0.5, initial_state=init, output_final_state=True,
                             use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                             use_beta_sigmoid_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                             cu_seqlens=cu, chunk_layout=layout.chunk_layout, out=out.view(1, T, H, D))
        ssm_state[slots.long()] = final.to(ssm_state.dtype)

    def _profile_prefill(self, qkv, f, b) -> None:
        """vLLM's profile run (a forward without metadata) skips every KDA layer. Once per process,
        run the prefill over its tokens as one new sequence into scratch state slots shaped as
        the real ones: our Triton kernels compile now, not at the first request (as vLLM warms
        its own GDN kernels), and the prefill's intermediates count in the activation peak vLLM
        sizes the KV cache by. The layer's output stays zero, as a dummy run expects."""
        if KimiDeltaAttention._profiled or qkv.shape[0] == 0 or (
                qkv.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        KimiDeltaAttention._profiled = True
        from ..kda_metadata import PrefillLayout

        T, dev = qkv.shape[0], qkv.device
        (conv_shape, ssm_shape), (conv_dtype, ssm_dtype) = (kda_state_shape(self.vllm_config, self.dims),
                                                            kda_state_dtype(self.vllm_config))
        conv_state, ssm_state = self._state_views(torch.zeros(1, *conv_shape, dtype=conv_dtype, device=dev),
                                                  torch.zeros(1, *ssm_shape, dtype=ssm_dtype, device=dev))
        slot = torch.zeros(1, dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        self._prefill(qkv, f, b, torch.empty(T, self.heads, self.head_dim, dtype=qkv.dtype, device=dev),
                      conv_state, ssm_state, slot, torch.zeros(1, dtype=torch.bool, device=dev),
                      PrefillLayout.build([0, T], dev))
        logger.info("KDA prefill run once in the profile run (%d tokens, %.1f s): kernels compiled, "
                    "its memory profiled", T, time.perf_counter() - t0)
