"""What the plugin changes in vLLM's CPU platform so Kimi Linear gets chunked prefill and
prefix caching there too (they are how 1M-token prompts are served, and how CI exercises the
hybrid state manager).

1. adapt_cpu_config (chunked prefill, prefix caching): CpuPlatform.check_and_update_config turns both off
   for every MLA model, because its reference MLA backend was written for whole prompts. For
   Kimi Linear we restore what the user asked for: the MLA prefill of a later chunk attends to
   the cached latent through vLLM's own CPU context gather + the CPU SDPA prefill backend (both
   return the softmax LSE the merge needs), and the KDA state of a prefix hit is the one vLLM's
   "align" mode saved at the block boundary.
2. cpu_batch_memcpy: in "align" mode the runner copies each request's KDA state (conv + recurrent)
   from its previous block to its current one with a Triton kernel on raw pointers, which cannot
   run on CPU. The same copies by memmove (overlap-safe, like the kernel).
3. seeded sampling across prefill chunks: a step that ends inside a prompt still samples (the
   token is discarded), and vLLM then rewinds the request's generator by its Philox offset,
   which CPU generators do not have ("CPU Generator does not use offset" killed the engine).
   On CPU we save those generators' states before sampling and put them back after, which is
   the same rewind, so a seeded request's tokens do not depend on how its prompt was chunked.
Installed from register() on the CPU platform only.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import ARCH


def _is_kimi_linear(vllm_config) -> bool:
    mc = vllm_config.model_config
    return mc is not None and ARCH in (getattr(mc, "architectures", None) or [])


def adapt_cpu_config(platform_cls) -> None:
    """Wraps CpuPlatform.check_and_update_config: for Kimi Linear, pick the MLA backend before it
    runs and restore chunked prefill / prefix caching after (items 1 and 4 above)."""
    original = platform_cls.check_and_update_config.__func__
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        if not _is_kimi_linear(vllm_config):
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


def cpu_batch_memcpy(src_ptrs, dst_ptrs, sizes) -> None:
    for src, dst, n in zip(src_ptrs.tolist(), dst_ptrs.tolist(), sizes.tolist()):
        ctypes.memmove(dst, src, n)


def _discarded_generators(runner) -> dict:
    n = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    return {int(i): gens[int(i)] for i in np.nonzero(runner.discard_request_mask.np[:n])[0]
            if int(i) in gens}


def rewind_generators_by_state(runner_cls) -> None:
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync
    if getattr(sample, "_kimi_linear_wrapped", False):
        return

    def _sample(self, *args, **kwargs):
        saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
        out = sample(self, *args, **kwargs)
        for i, st in saved.items():
            self.input_batch.generators[i].set_state(st)
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        # already rewound above: hide them from vLLM's offset-based rewind
        hidden = _discarded_generators(self)
        for i in hidden:
            del self.input_batch.generators[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(hidden)

    _sample._kimi_linear_wrapped = True
    runner_cls._sample, runner_cls._bookkeeping_sync = _sample, _bookkeeping_sync


def install() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker import mamba_utils
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    adapt_cpu_config(CpuPlatform)
    mamba_utils.batch_memcpy = cpu_batch_memcpy
    rewind_generators_by_state(CPUModelRunner)
