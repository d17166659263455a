"""KimiLinearForCausalLM for vLLM: the decoder stack, the hybrid-state classmethods, and loading.

This module owns how layers are assembled from config.json (1-based kda_layers /
full_attn_layers; dense MLP before first_k_dense_replace, MoE after), the classmethods vLLM uses
to size the KDA state pages (they must agree with KimiDeltaAttention.get_state_*), and weight
loading from the published checkpoint names, with one clear error for a missing tensor or a
wrong shape (checked against config.json before vLLM's loaders see the tensor).
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_ep_group, get_pp_group
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import fused_moe_make_expert_params_mapping
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (HasInnerState, IsHybrid, MixtureOfExperts,
                                                   SupportsPP)
from vllm.model_executor.models.utils import (PPMissingLayer, is_pp_missing_parameter,
                                              make_empty_intermediate_tensors_factory, make_layers)
from vllm.sequence import IntermediateTensors

from .checkpoint import check_all_present, check_no_quant_tensors, check_tensor, expected_tensors, quant_scheme
from .config import KimiLinearDims, raw_config
from .layers.kda import KimiDeltaAttention, kda_packed_modules, kda_state_dtype, kda_state_shape
from .layers.mla import mla_layer
from .layers.moe import KimiMLP, KimiMoE


logger = init_logger("vllm.kimi_linear")


class KimiDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, i: int, prefix: str):
        super().__init__()
        attn = KimiDeltaAttention if dims.is_kda(i) else mla_layer
        self.self_attn = attn(vllm_config, dims, prefix=f"{prefix}.self_attn")
        if dims.is_moe(i):
            self.block_sparse_moe = KimiMoE(vllm_config, dims, prefix=f"{prefix}.block_sparse_moe")
        else:
            self.mlp = KimiMLP(dims.hidden_size, dims.intermediate_size, vllm_config.quant_config,
                               prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        # Pre-norm residual block; vLLM's RMSNorm(x, residual) fuses the add and returns both.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states=hidden_states, positions=positions)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return ffn(hidden_states), residual


class KimiLinearModel(nn.Module):
    """The decoder stack; with pipeline parallelism this rank builds only its stage's layers
    (vLLM's `make_layers`; the rest are PPMissingLayer), the embedding on the first stage and the
    final norm on the last, and hands (hidden_states, residual) to the next stage."""

    def __init__(self, vllm_config: VllmConfig, dims: KimiLinearDims, prefix: str = "model"):
        super().__init__()
        pp = get_pp_group()
        self.embed_tokens = (VocabParallelEmbedding(dims.vocab_size, dims.hidden_size,
                                                    prefix=f"{prefix}.embed_tokens")
                             if pp.is_first_rank else PPMissingLayer())
        self.start_layer, self.end_layer, self.layers = make_layers(
            dims.num_layers, lambda prefix: KimiDecoderLayer(vllm_config, dims, int(prefix.rsplit(".", 1)[1]),
                                                             prefix), prefix=f"{prefix}.layers")
        self.norm = RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], dims.hidden_size)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        pp = get_pp_group()
        if pp.is_first_rank:
            h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
            residual = None
        else:
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            h, residual = layer(positions, h, residual)
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": h, "residual": residual})
        h, _ = self.norm(h, residual)
        return h


def packed_modules(quantized: bool) -> dict[str, list[str]]:
    """Our merged module -> the checkpoint modules it holds, in shard order."""
    return {"gate_up_proj": ["gate_proj", "up_proj"], **kda_packed_modules(quantized)}


class KimiLinearForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsPP, MixtureOfExperts):
    # vLLM hands this to the quantization config before the model exists (to match a merged
    # layer's shards against the checkpoint's per-module quantization): quantized layout.
    packed_modules_mapping = packed_modules(quantized=True)

    def __new__(cls, *args, vllm_config: VllmConfig | None = None, prefix: str = "", **kwargs):
        # vLLM builds Kimi-K3's language model through this same registry name, as a submodel
        # (`init_vllm_registered_model`): that one stays vLLM's own class. Kimi Linear itself is
        # never a submodel.
        if vllm_config is not None and getattr(vllm_config.model_config, "is_submodel_config", False):
            from vllm.models.kimi_k3 import KimiLinearForCausalLM as VllmKimiLinear
            return VllmKimiLinear(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        # Also checked by the config hook at start-up; repeated here for direct constructions.
        from vllm.platforms import current_platform
        self.config = vllm_config.model_config.hf_config
        mc = vllm_config.model_config
        cfg = raw_config(mc.hf_config, mc.model)
        self.quant = quant_scheme(cfg)
        d = self.dims = KimiLinearDims.from_config(cfg).check_servable(
            vllm_config.parallel_config.tensor_parallel_size, on_cpu=current_platform.is_cpu())
        # (our name piece, checkpoint name piece, shard id) for the loader
        self.stacked_params = [(f".{ours}.", f".{ckpt}.", i) for ours, ckpts in
                               packed_modules(vllm_config.quant_config is not None).items()
                               for i, ckpt in enumerate(ckpts)]
        self.model = KimiLinearModel(vllm_config, d, prefix="model")
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(d.vocab_size, d.hidden_size,
                                          quant_config=vllm_config.quant_config, prefix="lm_head")
            if d.tie_word_embeddings:  # (with PP > 1 the hook refuses tied embeddings)
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(d.vocab_size)
        self._init_moe_metadata(vllm_config)

    # ---- MixtureOfExperts (what vLLM's expert-parallel load balancer reads and updates)
    def _init_moe_metadata(self, vllm_config: VllmConfig) -> None:
        layers = self.model.layers[self.model.start_layer:self.model.end_layer]
        self.moe_layers = [layer.block_sparse_moe.experts for layer in layers
                           if hasattr(layer, "block_sparse_moe")]
        moe = self.dims.moe
        self.num_moe_layers = len(self.moe_layers)
        self.num_expert_groups = moe.num_expert_group
        self.num_logical_experts = self.num_routed_experts = moe.num_experts
        self.num_shared_experts = moe.num_shared_experts
        self.num_redundant_experts = vllm_config.parallel_config.eplb_config.num_redundant_experts
        self.num_physical_experts = self.num_logical_experts + self.num_redundant_experts
        ep = get_ep_group().world_size if vllm_config.parallel_config.enable_expert_parallel else 1
        self.num_local_physical_experts = self.num_physical_experts // ep
        self.expert_weights = []

    def update_physical_experts_metadata(self, num_physical_experts: int,
                                         num_local_physical_experts: int) -> None:
        self.num_physical_experts = num_physical_experts
        self.num_local_physical_experts = num_local_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
        for experts in self.moe_layers:
            experts.update_expert_map()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- hybrid state: must match KimiDeltaAttention.get_state_shape / get_state_dtype
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return kda_state_shape(vllm_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return kda_state_dtype(vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.kda_state_copy_func()

    # ---- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        expected = expected_tensors(self.dims, self.quant)
        params = dict(self.named_parameters())
        experts = fused_moe_make_expert_params_mapping(self, ckpt_gate_proj_name="w1",
                                                       ckpt_down_proj_name="w2",
                                                       ckpt_up_proj_name="w3",
                                                       num_experts=self.dims.moe.num_experts,
                                                       num_redundant_experts=self.num_redundant_experts)
        seen: set[str] = set()
        loaded: set[str] = set()
        mtp, skipped = 0, []
        for name, w in weights:
            if not check_tensor(expected, name, w.shape):
                skipped.append(name)
                # e.g. rotary_emb.inv_freq, or the multi-token-prediction layers after the decoder
                mtp += name.startswith("model.layers.") and int(name.split(".")[2]) >= self.dims.num_layers
                continue
            seen.add(name)
            target = self._load_one(params, experts, name, w)
            if target is not None:
                loaded.add(target)
        if self.quant is None:
            check_no_quant_tensors(skipped)
        check_all_present(expected, seen)
        if mtp:
            logger.info("Kimi Linear: skipped %d tensors of the checkpoint's %d multi-token-prediction "
                        "layer(s) (num_nextn_predict_layers): serving does not use them", mtp,
                        self.dims.mtp_layers)
        return loaded

    def _load_one(self, params, experts, name: str, w: torch.Tensor) -> str | None:
        """Load one checkpoint tensor; the parameter it went to, or None when that parameter
        belongs to another pipeline stage (or the expert to another expert-parallel rank)."""
        if is_pp_missing_parameter(name, self):
            return None
        for ours, ckpt, shard in self.stacked_params:
            if ckpt not in name:
                continue
            target = name.replace(ckpt, ours)
            if target in params:  # (an MLA layer's q_proj is its own)
                params[target].weight_loader(params[target], w, shard)
                return target
        expert_target = None
        for ours, ckpt, expert_id, shard in experts:
            if ckpt in name:
                # one entry per physical expert holding this logical one (EPLB replicas); with
                # expert parallelism each rank loads only the experts it holds
                expert_target = name.replace(ckpt, ours)
                p = params[expert_target]
                if p.weight_loader(p, w, expert_target, shard_id=shard, expert_id=expert_id,
                                   return_success=True):
                    return expert_target
        if expert_target is not None:
            return None
        p = params[name]
        getattr(p, "weight_loader", default_weight_loader)(p, w)
        return name
