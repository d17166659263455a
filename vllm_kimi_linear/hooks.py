"""The config hook vLLM runs for KimiLinearForCausalLM while it builds the VllmConfig.

Runs in the front-end process before any worker starts, so a bad config.json, or a local
checkpoint whose tensors do not match it (names and shapes, read from the safetensors headers),
is ONE clear ValueError at start-up rather than a failure inside a worker. On CPU it also turns prefix caching off: vLLM's hybrid hook would
otherwise put the KDA state cache in "align" mode, and the CPU platform later disables prefix
caching (and chunked prefill) for every MLA model, which then fails validation with
"--mamba-block-size can only be set with --enable-prefix-caching".
"""
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .config import check_checkpoint, raw_config, validate_config


class KimiLinearConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        from vllm.platforms import current_platform

        mc = vllm_config.model_config
        on_cpu = current_platform.is_cpu()
        cfg = raw_config(mc.hf_config, mc.model)
        validate_config(cfg, tp_size=vllm_config.parallel_config.tensor_parallel_size, on_cpu=on_cpu)
        check_checkpoint(cfg, mc.model)
        if on_cpu:
            # TODO(later issue): KDA state checkpoints per block to re-enable these on CPU.
            vllm_config.cache_config.enable_prefix_caching = False
