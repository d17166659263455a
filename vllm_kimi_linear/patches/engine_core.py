"""EngineCore: the Kimi Linear state layout log line after the KV cache is sized (Kimi Linear
only), and the utility method `kimi_linear_state` (an addition: vLLM's front end reaches it
through `call_utility_async`, as it does vLLM's own utilities; the state route reads it).
"""
from __future__ import annotations


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    from . import written_for
    written_for(__name__)

    if getattr(EngineCore, "kimi_linear_state", None) is not None:
        return
    from vllm.logger import init_logger

    from .. import ARCH
    from ..state_manager import describe_layout, engine_state
    log = init_logger("vllm.kimi_linear")  # under vLLM's logger, so it shows with its lines
    original_init_kv = EngineCore._initialize_kv_caches

    def _initialize_kv_caches(self, vllm_config):
        kv_cache_config = original_init_kv(self, vllm_config)
        if ARCH in (vllm_config.model_config.architectures or []):
            try:
                self._kimi_layout = describe_layout(vllm_config, kv_cache_config)
                log.info(self._kimi_layout.summary())
            except Exception:  # reporting must never stop an engine from starting
                log.exception("could not describe the Kimi Linear state layout")
        return kv_cache_config

    EngineCore._initialize_kv_caches = _initialize_kv_caches
    EngineCore.kimi_linear_state = engine_state
