"""KVCacheManager.make_prefix_cache_stats of a Kimi Linear engine's scheduler (that instance only;
adds state, changes no result).

vLLM hands its per-step prefix-cache stats to the front end and resets them (the front end sums
them into its Prometheus counters); the state route and gauges need totals in the engine core.
Applied to the one manager instance by `engine_core` once a Kimi Linear engine has built its
scheduler, so other models' engines, and the class, are untouched. (A stat-logger plugin would
see the same numbers, but in the front end only, a step late, and not in offline `LLM` engines,
whose state the tests read through the same utility.)
"""
from __future__ import annotations


def keep_prefix_totals(kvm) -> None:
    """Wrap this manager's make_prefix_cache_stats to keep running (queries, hits) totals."""
    original = kvm.make_prefix_cache_stats
    if getattr(original, "_kimi_linear_wrapped", False):
        return

    def make_prefix_cache_stats():
        stats = original()
        if stats is not None:
            q, h = getattr(kvm, "_kimi_prefix_totals", (0, 0))
            kvm._kimi_prefix_totals = (q + stats.queries, h + stats.hits)
        return stats

    make_prefix_cache_stats._kimi_linear_wrapped = True
    kvm.make_prefix_cache_stats = make_prefix_cache_stats
