"""The full-attention layers: multi-head latent attention without rotary embedding (NoPE).

This module owns the MLA projections, named as in the checkpoint, and hands them to vLLM's
MultiHeadLatentAttentionWrapper with rotary_emb=None; vLLM then does the latent KV cache (576
values per token: 512 latent + 64 "rope" part, unrotated), the weight absorption for decode,
and the attention backend (CPU_MLA on CPU). TP: heads sharded, the latent path replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper

from ..config import KimiLinearDims


class KimiMLAAttention(nn.Module):
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

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mla_attn(positions, hidden_states)
