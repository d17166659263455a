"""CPUModelRunner, every model on CPU (three plain bug fixes).

1. _zero_block_ids: with Mamba-type layers present vLLM zeroes every newly allocated attention
   block. CPUModelRunner does `kv[block_id].zero_()` with the *manager* block id, but once blocks
   are split into kernel blocks (patches/cpu_mla_backend.py) the MLA cache is indexed in *kernel*
   blocks, so it zeroes the wrong 16 tokens: another request's MLA cache or, through the pool the
   groups share, a KDA state slot (seen as wrong greedy tokens after a new request arrives). We
   zero every kernel block of each new manager block instead.
2. _sample / _bookkeeping_sync, seeded sampling across prefill chunks: a step that ends inside a
   prompt still samples (the token is discarded), and vLLM then rewinds the request's generator
   by its Philox offset, which CPU generators do not have ("CPU Generator does not use offset"
   killed the engine). We save those generators' states before sampling and put them back after,
   which is the same rewind, so a seeded request's tokens do not depend on how its prompt was
   chunked.
3. initialize_kv_cache, pipeline parallelism: a later stage receives the previous stage's
   hidden states into `intermediate_tensors`, which the GPU runner allocates in its warm-up
   dummy run; the CPU runner warms up only when it compiles, so with compilation off (vLLM's
   mode for this architecture, or --enforce-eager) the first step of a later stage died on
   `assert self.intermediate_tensors is not None`. We allocate them with the KV cache.
"""
from __future__ import annotations

import numpy as np
import torch


def zero_block_ids_in_kernel_blocks(self, block_ids: list[int]) -> None:
    """Replacement for CPUModelRunner._zero_block_ids (same filter, kernel-block aware)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    num_blocks = self.kv_cache_config.num_blocks
    seen: set[int] = set()
    for group in self.kv_cache_config.kv_cache_groups:
        if not isinstance(group.kv_cache_spec, FullAttentionSpec):
            continue
        for layer_name in group.layer_names:
            ctx = self.compilation_config.static_forward_context.get(layer_name)
            kv = getattr(ctx, "kv_cache", None)
            if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            # kernel blocks per manager block (1 when blocks were not split)
            ratio = kv.shape[0] // num_blocks if kv.shape[0] % num_blocks == 0 else 1
            for b in block_ids:
                kv[b * ratio:(b + 1) * ratio].zero_()


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


def allocate_intermediate_tensors(runner_cls) -> None:
    original = runner_cls.initialize_kv_cache
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def initialize_kv_cache(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        from vllm.distributed import get_pp_group
        if not get_pp_group().is_first_rank and self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return out

    initialize_kv_cache._kimi_linear_wrapped = True
    runner_cls.initialize_kv_cache = initialize_kv_cache


def install() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from . import written_for
    written_for(__name__)
    CPUModelRunner._zero_block_ids = zero_block_ids_in_kernel_blocks
    rewind_generators_by_state(CPUModelRunner)
    allocate_intermediate_tensors(CPUModelRunner)
