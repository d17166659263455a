"""CpuPlatform.check_and_update_config, for Kimi Linear only: chunked prefill and prefix caching
(they are how 1M-token prompts are served, and how CI exercises the hybrid state manager), and
the MLA backend.

1. chunked prefill, prefix caching: CpuPlatform.check_and_update_config turns both off
   for every MLA model, because its reference MLA backend was written for whole prompts. For
   Kimi Linear we restore what the user asked for: the MLA prefill of a later chunk attends to
   the cached latent through vLLM's own CPU context gather + the CPU SDPA prefill backend (both
   return the softmax LSE the merge needs), and the KDA state of a prefix hit is the one vLLM's
   "align" mode saved at the block boundary.
2. the MLA backend: vLLM picks AMX_MLA on CPUs with AMX tiles, whose weight packing refuses
   float32 deep in a worker; Kimi Linear gets CPU_MLA unless --attention-backend names one.
"""
from __future__ import annotations

from . import is_kimi_linear


def adapt_cpu_config(platform_cls) -> None:
    """Wraps CpuPlatform.check_and_update_config: for Kimi Linear, pick the MLA backend before it
    runs and restore chunked prefill / prefix caching after."""
    original = platform_cls.check_and_update_config.__func__
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        if not is_kimi_linear(vllm_config):
            return original(cls, vllm_config)
        choose_mla_backend(vllm_config)
        sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
        wanted = (sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens)
        original(cls, vllm_config)
        sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens = wanted

    check_and_update_config._kimi_linear_wrapped = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def choose_mla_backend(vllm_config) -> None:
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    ac = vllm_config.attention_config
    if ac.backend is None:
        ac.backend = AttentionBackendEnum.CPU_MLA
    elif ac.backend == AttentionBackendEnum.AMX_MLA and vllm_config.model_config.dtype == torch.float32:
        raise ValueError("--attention-backend AMX_MLA takes bf16/fp16 weights, but the model's dtype "
                         "is float32: serve with --dtype bfloat16, or leave --attention-backend out "
                         "(Kimi Linear then uses CPU_MLA, which runs float32).")


def install() -> None:
    from vllm.platforms.cpu import CpuPlatform

    from . import written_for
    written_for(__name__)
    adapt_cpu_config(CpuPlatform)
