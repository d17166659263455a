"""The config hook vLLM runs for KimiLinearForCausalLM while it builds the VllmConfig.

Runs in the front-end process before any worker starts, so a bad config.json, or a local
checkpoint whose tensors do not match it (names and shapes, read from the safetensors headers),
is ONE clear ValueError at start-up rather than a failure inside a worker.
"""
from pathlib import Path

from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.utils.torch_utils import is_quantized_kv_cache

from .checkpoint import check_checkpoint, quant_scheme
from .config import raw_config, validate_config


class KimiLinearConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        pick_tokenizer_mode(model_config)

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        from vllm.platforms import current_platform

        if getattr(vllm_config, "speculative_config", None) is not None:
            # The KDA layer has no draft-token state yet (vLLM's metadata carries spec fields it
            # would ignore): refuse here rather than serve wrong tokens.
            raise ValueError("Kimi Linear (vllm-kimi-linear) does not support speculative decoding "
                             "yet: serve without --speculative-config")
        pc = vllm_config.parallel_config
        if getattr(pc, "use_ubatching", False):
            # list-shaped (per micro-batch) metadata would reach a layer that reads one batch
            raise ValueError("Kimi Linear (vllm-kimi-linear) does not support micro-batching yet: "
                             "serve without --enable-dbo / --ubatch-size")
        if max(pc.decode_context_parallel_size, pc.prefill_context_parallel_size) > 1:
            # Context parallelism splits a sequence's tokens (or its KV cache) across ranks; a KDA
            # layer's recurrent state is a scan over every token of its sequence on one rank.
            raise ValueError("Kimi Linear (vllm-kimi-linear) does not support context parallelism: "
                             "the KDA layers' recurrent state needs all of a sequence's tokens on one "
                             "rank; serve without --decode-context-parallel-size / "
                             "--prefill-context-parallel-size (split the model with "
                             "--tensor-parallel-size or --pipeline-parallel-size instead)")
        mc = vllm_config.model_config
        on_cpu = current_platform.is_cpu()
        if on_cpu and pc.enable_expert_parallel:
            # vLLM 0.32's CPU MoE kernels index their local experts with the global expert ids
            # (they ignore the expert map): the worker segfaults at the first forward.
            raise ValueError("Kimi Linear (vllm-kimi-linear) on CPU: --enable-expert-parallel is not "
                             "supported by vLLM's CPU MoE kernels (the worker would crash); on CPU "
                             "serve with --tensor-parallel-size alone (experts are then split by "
                             "intermediate size)")
        cache_dtype = vllm_config.cache_config.cache_dtype
        if on_cpu and is_quantized_kv_cache(cache_dtype):
            # vLLM 0.32's CPU MLA path asserts on a quantized cache at the first prefill: a dead engine
            raise ValueError(f"Kimi Linear (vllm-kimi-linear) on CPU: --kv-cache-dtype {cache_dtype} is "
                             f"not supported by vLLM's CPU MLA kernels (the engine would die at the "
                             f"first prompt); serve with the default --kv-cache-dtype auto")
        cfg = raw_config(mc.hf_config, mc.model)
        dims = validate_config(cfg, tp_size=pc.tensor_parallel_size,
                               on_cpu=on_cpu)
        check_published_files(cfg, mc)
        check_checkpoint(dims, mc.model, quant_scheme(cfg))
        check_quantization(mc.quantization, cfg)
        if pc.pipeline_parallel_size > 1 and dims.tie_word_embeddings:
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
            use_tuned_moe_configs()


def check_quantization(method: str | None, cfg: dict) -> None:
    """`--quantization X` on a checkpoint whose config.json says otherwise, or online
    quantization of an unquantized one: refused by name (only FP8 checkpoints are served
    quantized; an online method would quantize b_proj and the rest unverified)."""
    stored = (cfg.get("quantization_config") or {}).get("quant_method")
    if method is not None and method != stored:
        raise ValueError(
            f"Kimi Linear (vllm-kimi-linear): --quantization {method} on a checkpoint whose "
            f"config.json quantization_config is {stored!r}: online quantization is not supported; "
            "serve an FP8 checkpoint (python -m vllm_kimi_linear.tools.quantize makes one from a "
            "bfloat16 checkpoint) or drop --quantization")


def pick_tokenizer_mode(model_config) -> None:
    """tokenizer_mode "auto" on a checkpoint that ships tiktoken.model and no tokenizer.json (the
    published layout) -> "kimi_linear", the published algorithm (tokenizer.py), with or without
    --trust-remote-code. Runs as the ModelConfig is built, before any process loads a tokenizer;
    an explicit --tokenizer-mode is kept."""
    from vllm.logger import init_logger

    from . import TOKENIZER_MODE
    from .tokenizer import VOCAB_FILE, local_dir

    # a Hub id: its non-weight files, as vLLM's HF tokenizer would fetch them anyway
    d = local_dir(model_config.tokenizer, model_config.tokenizer_revision)
    if model_config.tokenizer_mode == TOKENIZER_MODE:
        if not (d / VOCAB_FILE).is_file():
            raise ValueError(f"--tokenizer-mode {TOKENIZER_MODE} needs {VOCAB_FILE}, which "
                             f"{model_config.tokenizer} does not have: leave --tokenizer-mode out")
        return
    if not (d / VOCAB_FILE).is_file() or (d / "tokenizer.json").is_file():
        return
    log = init_logger("vllm.kimi_linear")  # under vLLM's logger: printed with its own lines
    if model_config.tokenizer_mode == "auto":
        model_config.tokenizer_mode = TOKENIZER_MODE
        log.info("Kimi Linear: %s has %s: tokenizer mode %r (the published tiktoken tokenizer)",
                 d, VOCAB_FILE, TOKENIZER_MODE)
    else:
        log.warning("Kimi Linear: --tokenizer-mode %s on a checkpoint with %s: transformers converts "
                    "it with a generic split pattern, which tokenizes Chinese, CamelCase and long "
                    "whitespace differently from the published tokenizer; leave --tokenizer-mode "
                    "out to get it", model_config.tokenizer_mode, VOCAB_FILE)


def check_published_files(cfg: dict, model_config) -> None:
    """The published layout's files against config.json: the shard index, and tiktoken.model /
    tokenizer_config.json when the tokenizer is the checkpoint's own."""
    from pathlib import Path

    from .checkpoint_index import check_index
    from .tokenizer import check_tokenizer_files

    check_index(model_config.model)
    if Path(str(model_config.tokenizer)) == Path(str(model_config.model)):
        check_tokenizer_files(model_config.model, cfg["vocab_size"],
                              {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


MOE_CONFIGS = Path(__file__).parent / "moe_configs"


def use_tuned_moe_configs(folder: Path = MOE_CONFIGS) -> None:
    """Point vLLM at the fused-MoE tile configurations tuned for Kimi Linear's expert shapes
    (`tools/tune_moe.py`; vLLM ships none for them on an H200), unless the user names a folder of
    their own. Set here, in the front end, so the engine processes started next inherit it; vLLM
    reads a file only for its own (experts, intermediate size, GPU) name."""
    import os

    from vllm.logger import init_logger
    if not any(folder.glob("E=*.json")):
        return
    if os.environ.get("VLLM_TUNED_CONFIG_FOLDER"):
        init_logger("vllm.kimi_linear").info(
            "VLLM_TUNED_CONFIG_FOLDER is set: vLLM reads MoE configs from there, not the ones "
            "tuned for Kimi Linear in %s (copy them over to use both)", folder)
        return
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(folder)
