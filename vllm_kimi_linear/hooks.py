"""The config hook vLLM runs for KimiLinearForCausalLM while it builds the VllmConfig.

Runs in the front-end process before any worker starts, so a bad config.json, or a local
checkpoint whose tensors do not match it (names and shapes, read from the safetensors headers),
is ONE clear ValueError at start-up rather than a failure inside a worker.
"""
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .checkpoint import check_checkpoint
from .config import raw_config, validate_config


class KimiLinearConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        from vllm.platforms import current_platform

        if getattr(vllm_config, "speculative_config", None) is not None:
            # The KDA layer has no draft-token state yet (vLLM's metadata carries spec fields it
            # would ignore): refuse here rather than serve wrong tokens.
            raise ValueError("Kimi Linear (vllm-kimi-linear) does not support speculative decoding "
                             "yet: serve without --speculative-config")
        if getattr(vllm_config.parallel_config, "use_ubatching", False):
            # list-shaped (per micro-batch) metadata would reach a layer that reads one batch
            raise ValueError("Kimi Linear (vllm-kimi-linear) does not support micro-batching yet: "
                             "serve without --enable-dbo / --ubatch-size")
        mc = vllm_config.model_config
        on_cpu = current_platform.is_cpu()
        cfg = raw_config(mc.hf_config, mc.model)
        dims = validate_config(cfg, tp_size=vllm_config.parallel_config.tensor_parallel_size,
                               on_cpu=on_cpu)
        check_checkpoint(dims, mc.model)
        if vllm_config.parallel_config.pipeline_parallel_size > 1 and dims.tie_word_embeddings:
            raise ValueError("Kimi Linear config.json: tie_word_embeddings=true with "
                             "--pipeline-parallel-size > 1: the embedding (first stage) and lm_head "
                             "(last stage) cannot share one tensor; serve without pipeline parallelism "
                             "or with an untied checkpoint")
        if not dims.kda_layers:
            # Every layer MLA (the all-MLA baseline): say so the way vLLM reads it for hybrid
            # classes whose config has no non-attention layer (ModelConfig.is_hybrid's
            # layer_types check), so vLLM sizes no KDA state pages and runs prefix caching as for
            # any attention model; as a hybrid its runner would die at the first request
            # ("no mamba layers in the model").
            mc.hf_config.layer_types = ["full_attention"] * dims.num_layers
        if current_platform.is_cuda():
            from .cuda_checks import check_cuda_mla
            check_cuda_mla(mc.dtype, dims.mla, current_platform)
