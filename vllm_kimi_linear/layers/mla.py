"""The full-attention layers: multi-head latent attention without rotary embedding (NoPE).

This module owns the choice of MLA layer and, on platforms other than CUDA, the layer itself.
Both hold the checkpoint's projections under the checkpoint's names (self_attn.q_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), take `(positions, hidden_states)` and
keep a paged latent cache of 576 values per token (512 latent + 64 "rope" part, unrotated).

- CUDA, unquantized latent cache: vLLM's own Kimi MLA layer (`vllm.models.kimi_k3.nvidia.mla`,
  the one vLLM's in-tree Kimi Linear serves with). It fuses what the generic path runs as
  separate kernels: the decode query concat with the cache insert, the prefill key concat with
  the cache insert, and, per chunk of cached context in a long prefill, the up-projected K/V
  packing, written straight into the partial it merges.
- Elsewhere (CPU; a quantized KV cache, which that layer takes only with an fp8 prefill query):
  `KimiMLAAttention`, vLLM's generic `MultiHeadLatentAttentionWrapper` with rotary_emb=None.

TP: heads sharded, the latent path replicated, in both.
"""
from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache

from ..config import KimiLinearDims


def uses_fused_mla(vllm_config: VllmConfig) -> bool:
    """Whether the MLA layers are vLLM's fused Kimi MLA layer (see the module docstring)."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    return current_platform.is_cuda() and not is_quantized_kv_cache(cache_dtype)


def mla_layer(vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str) -> nn.Module:
    if not uses_fused_mla(vllm_config):
        return KimiMLAAttention(vllm_config, dims, prefix)
    from vllm.models.kimi_k3.nvidia.mla import MultiHeadLatentAttention
    mla = dims.mla
    return MultiHeadLatentAttention(
        config=SimpleNamespace(rms_norm_eps=dims.rms_norm_eps),  # all it reads without RoPE
        hidden_size=dims.hidden_size, num_heads=mla.num_heads,
        qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim, q_lora_rank=None,  # full-rank q_proj, as Kimi Linear has
        kv_lora_rank=mla.kv_lora_rank, use_output_gate=False,
        cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
        prefix=prefix, use_rope=False)


class KimiMLAAttention(nn.Module):
    """vLLM's generic MLA path: the projections handed to MultiHeadLatentAttentionWrapper, which
    does the latent KV cache, the weight absorption for decode and the attention backend
    (CPU_MLA on CPU)."""

    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str):
        super().__init__()
        hid, mla, quant = dims.hidden_size, dims.mla, vllm_config.quant_config
        n, nope, rope, v, r = (mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                               mla.v_head_dim, mla.kv_lora_rank)
        # Attribute order matters: these register first, so parameters keep checkpoint names
        # (self_attn.q_proj.weight, ...) although the wrapper holds the same modules.
        self.q_proj = ColumnParallelLinear(hid, n * (nope + rope), bias=False, quant_config=quant,
                                           prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hid, r + rope, bias=False, quant_config=quant,
                                                   prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(r, eps=dims.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(r, n * (nope + v), bias=False, quant_config=quant,
                                              prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(n * v, hid, bias=False, quant_config=quant,
                                        prefix=f"{prefix}.o_proj")
        mods = MLAModules(kv_a_layernorm=self.kv_a_layernorm, kv_b_proj=self.kv_b_proj,
                          rotary_emb=None,  # NoPE: Kimi Linear's MLA applies no rotary embedding
                          o_proj=self.o_proj, fused_qkv_a_proj=None,
                          kv_a_proj_with_mqa=self.kv_a_proj_with_mqa, q_a_layernorm=None,
                          q_b_proj=None, q_proj=self.q_proj, indexer=None, is_sparse=False,
                          topk_indices_buffer=None)
        local_heads = n // get_tensor_model_parallel_world_size()  # the wrapper wants this rank's
        self.mla_attn = MultiHeadLatentAttentionWrapper(
            hid, local_heads, (nope + rope) ** -0.5, nope, rope, v, None, r, mods,
            cache_config=vllm_config.cache_config, quant_config=quant,
            prefix=prefix)

    def forward(self, positions, hidden_states):
        return self.mla_attn(positions, hidden_states)
