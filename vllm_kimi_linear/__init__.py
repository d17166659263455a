"""vllm-kimi-linear: serves Kimi Linear models through vLLM as a general plugin.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every process (API
server, engine core, workers), possibly more than once, so it is idempotent. Importing this
package does not import vLLM: register() imports it lazily.
"""

ARCH = "KimiLinearForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    # A "module:Class" string is registered lazily and replaces vLLM's in-tree Kimi Linear
    # (which cannot run on CPU: CUDA streams, Triton-only KDA, NVIDIA MLA).
    ModelRegistry.register_model(ARCH, "vllm_kimi_linear.model:KimiLinearForCausalLM")

    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .hooks import KimiLinearConfigHook
    MODELS_CONFIG_MAP[ARCH] = KimiLinearConfigHook

    # config.json's model_type "kimi_linear" already maps to vLLM's KimiLinearConfig (no
    # trust_remote_code needed); our own checks run in the hook above.
    from vllm.platforms import current_platform

    from . import patches
    patches.install(on_cpu=current_platform.is_cpu())  # what and why: patches/__init__.py

    _register_tokenizer()


TOKENIZER_MODE = "kimi_linear"


def _register_tokenizer() -> None:
    """Tokenizer mode "kimi_linear": the published tiktoken tokenizer (tokenizer.py), rendered
    by vLLM's HF renderer (Jinja chat template). The config hook picks it for kimi_linear
    checkpoints that ship tiktoken.model."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:  # register() runs more than once
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm_kimi_linear.tokenizer", "KimiLinearTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")
