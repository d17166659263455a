"""EngineCore (a Kimi Linear engine only, but the utility method): after the KV cache is sized,
the state layout log line; once the scheduler exists, prefix-cache totals on its KV cache
manager (`kv_cache_manager`); and the utility method `kimi_linear_state` (an addition: vLLM's
front end reaches it through `call_utility_async`, as it does vLLM's own utilities; the state
route reads it).
"""
from __future__ import annotations


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    from . import is_kimi_linear, written_for
    written_for(__name__)
    if getattr(EngineCore, "kimi_linear_state", None) is not None:
        return
    from vllm.logger import init_logger

    from ..state_manager import describe_layout, engine_state
    from .kv_cache_manager import keep_prefix_totals
    log = init_logger("vllm.kimi_linear")  # under vLLM's logger, so it shows with its lines
    original_init_kv = EngineCore._initialize_kv_caches
    original_after_scheduler = EngineCore._initialize_effective_attention_block_size

    def _initialize_kv_caches(self, vllm_config):
        kv_cache_config = original_init_kv(self, vllm_config)
        if is_kimi_linear(vllm_config):
            try:
                self._kimi_layout = describe_layout(vllm_config, kv_cache_config)
                log.info(self._kimi_layout.summary())
            except Exception:  # reporting must never stop an engine from starting
                log.exception("could not describe the Kimi Linear state layout")
        return kv_cache_config

    # EngineCore.__init__ cannot be wrapped: a fresh engine-core process loads the plugins (and so
    # these patches) from inside it. This method is the first one it calls once the scheduler exists.
    def _initialize_effective_attention_block_size(self, *args, **kwargs):
        out = original_after_scheduler(self, *args, **kwargs)
        kvm = getattr(getattr(self, "scheduler", None), "kv_cache_manager", None)
        if kvm is not None and is_kimi_linear(self.vllm_config):
            keep_prefix_totals(kvm)
        return out

    EngineCore._initialize_kv_caches = _initialize_kv_caches
    EngineCore._initialize_effective_attention_block_size = _initialize_effective_attention_block_size
    EngineCore.kimi_linear_state = engine_state
