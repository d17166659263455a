"""Two fixes that let a hybrid (KDA + MLA) model run on vLLM's CPU platform.

1. CPUMLAAnyBlock: vLLM aligns a hybrid model's attention block size to the KDA state page
   (128+ tokens), but the stock CPU_MLA backend accepts only block_size == 16 and start-up
   fails. Its kernel works on 16-token kernel blocks, so we keep
   get_supported_kernel_block_sizes() == [16] and accept any multiple of 16: the runner splits
   each manager block into 16-token kernel blocks.
2. zero_block_ids_in_kernel_blocks: with Mamba-type layers present vLLM zeroes every newly
   allocated attention block. CPUModelRunner does `kv[block_id].zero_()` with the *manager*
   block id, but once blocks are split (1.) the MLA cache is indexed in *kernel* blocks, so it
   zeroes the wrong 16 tokens: another request's MLA cache or, through the pool the groups
   share, a KDA state slot (seen as wrong greedy tokens after a new request arrives). We zero
   every kernel block of each new manager block instead.
Imported lazily from register(), on the CPU platform only.
"""
import torch
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend


class CPUMLAAnyBlock(CPUMLABackend):
    @classmethod
    def supports_block_size(cls, block_size):
        return block_size is None or block_size % 16 == 0


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


def install_runner_fix() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    CPUModelRunner._zero_block_ids = zero_block_ids_in_kernel_blocks
