"""What the plugin changes in vLLM's CPU platform so Kimi Linear gets chunked prefill and
prefix caching there too (they are how 1M-token prompts are served, and how CI exercises the
hybrid state manager).

1. keep_chunked_prefill_and_prefix_caching: CpuPlatform.check_and_update_config turns both off
   for every MLA model, because its reference MLA backend was written for whole prompts. For
   Kimi Linear we restore what the user asked for: the MLA prefill of a later chunk attends to
   the cached latent through vLLM's own CPU context gather + the CPU SDPA prefill backend (both
   return the softmax LSE the merge needs), and the KDA state of a prefix hit is the one vLLM's
   "align" mode saved at the block boundary.
2. cpu_batch_memcpy: in "align" mode the runner copies each request's KDA state (conv + recurrent)
   from its previous block to its current one with a Triton kernel on raw pointers, which cannot
   run on CPU. The same copies by memmove (overlap-safe, like the kernel).
Installed from register() on the CPU platform only.
"""
from __future__ import annotations

import ctypes

from . import ARCH


def _is_kimi_linear(vllm_config) -> bool:
    mc = vllm_config.model_config
    return mc is not None and ARCH in (getattr(mc, "architectures", None) or [])


def keep_chunked_prefill_and_prefix_caching(platform_cls) -> None:
    original = platform_cls.check_and_update_config.__func__
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
        wanted = (sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens)
        original(cls, vllm_config)
        if _is_kimi_linear(vllm_config):
            sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens = wanted

    check_and_update_config._kimi_linear_wrapped = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def cpu_batch_memcpy(src_ptrs, dst_ptrs, sizes) -> None:
    for src, dst, n in zip(src_ptrs.tolist(), dst_ptrs.tolist(), sizes.tolist()):
        ctypes.memmove(dst, src, n)


def install() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker import mamba_utils

    keep_chunked_prefill_and_prefix_caching(CpuPlatform)
    mamba_utils.batch_memcpy = cpu_batch_memcpy
