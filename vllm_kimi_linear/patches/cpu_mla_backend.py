"""The CPU_MLA attention backend, through vLLM's backend registry (every MLA model on CPU; a plain
bug fix for hybrid models, a no-op for others).

vLLM aligns a hybrid model's attention block size to the KDA state page (128+ tokens), but the
stock CPU_MLA backend accepts only block_size == 16 and start-up fails. Its kernel works on
16-token kernel blocks, so we keep get_supported_kernel_block_sizes() == [16] and accept any
multiple of 16: the runner splits each manager block into 16-token kernel blocks.
Registered from register(), on the CPU platform only.
"""
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend


class CPUMLAAnyBlock(CPUMLABackend):
    @classmethod
    def supports_block_size(cls, block_size):
        return block_size is None or block_size % 16 == 0


def install() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import written_for
    written_for(__name__)
    register_backend(AttentionBackendEnum.CPU_MLA, f"{__name__}.CPUMLAAnyBlock")
