"""The feed-forward blocks: the dense SwiGLU MLP (first_k_dense_replace layers) and the MoE.

MoE: sigmoid router scores in fp32, e_score_correction_bias used for expert selection only,
top-k renormalised and scaled by routed_scaling_factor (all inside vLLM's router), plus an
unscaled shared expert, through vLLM's FusedMoEFactory. Grouped top-k with one group is what
Kimi publishes and is also required by vLLM's CPU router for sigmoid scoring.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

from ..config import KimiLinearDims


class KimiMLP(nn.Module):
    """SwiGLU; checkpoint gate_proj/up_proj load into the fused gate_up_proj (shards 0/1)."""

    def __init__(self, hidden: int, inter: int, quant_config, prefix: str, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False,
                                                       quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, reduce_results=reduce_results,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)[0]))[0]


class KimiMoE(nn.Module):
    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str):
        super().__init__()
        moe = dims.moe
        E, H, I = moe.num_experts, dims.hidden_size, moe.intermediate_size
        # The router stays unquantized (as in DeepSeek/Kimi FP8 checkpoints): top-k is sensitive.
        self.gate = GateLinear(H, E, bias=False, out_dtype=torch.float32, prefix=f"{prefix}.gate")
        self.gate.e_score_correction_bias = nn.Parameter(torch.empty(E, dtype=torch.float32),
                                                         requires_grad=False)
        self.shared_experts = None
        if moe.num_shared_experts:
            # reduce_results=False: the MoE runner adds it to the routed output, then reduces once
            self.shared_experts = KimiMLP(H, moe.shared_intermediate_size, vllm_config.quant_config,
                                          f"{prefix}.shared_experts", reduce_results=False)
        parallel = vllm_config.parallel_config
        self.experts = FusedMoEFactory(
            shared_experts=self.shared_experts, num_experts=E, top_k=moe.top_k,
            hidden_size=H, intermediate_size=I, renormalize=moe.renormalize,
            use_grouped_topk=True, num_expert_group=moe.num_expert_group,
            topk_group=moe.topk_group, prefix=f"{prefix}.experts",
            scoring_func=moe.router_activation,
            e_score_correction_bias=self.gate.e_score_correction_bias,
            routed_scaling_factor=moe.routed_scaling_factor, quant_config=vllm_config.quant_config,
            enable_eplb=parallel.enable_eplb,
            num_redundant_experts=parallel.eplb_config.num_redundant_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gate(x)
        return self.experts(hidden_states=x, router_logits=logits, shared_experts_input=x)
