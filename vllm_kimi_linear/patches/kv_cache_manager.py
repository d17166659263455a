"""KVCacheManager.make_prefix_cache_stats: running prefix-cache totals in the engine core (every
model; adds state, changes no result).

vLLM hands its per-step prefix-cache stats to the front end and resets them (the front end sums
them into its Prometheus counters); the state route and gauges need totals in the engine core.
"""
from __future__ import annotations


def keep_prefix_totals(kvm_cls) -> None:
    """vLLM hands its per-step prefix-cache stats to the front end and resets them (the front
    end sums them into its Prometheus counters); keep running totals in the engine core too."""
    original = kvm_cls.make_prefix_cache_stats
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def make_prefix_cache_stats(self):
        stats = original(self)
        if stats is not None:
            q, h = getattr(self, "_kimi_prefix_totals", (0, 0))
            self._kimi_prefix_totals = (q + stats.queries, h + stats.hits)
        return stats

    make_prefix_cache_stats._kimi_linear_wrapped = True
    kvm_cls.make_prefix_cache_stats = make_prefix_cache_stats


def install() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from . import written_for
    written_for(__name__)
    keep_prefix_totals(KVCacheManager)
