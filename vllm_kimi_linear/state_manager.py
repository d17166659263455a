"""The paged hybrid state manager, as the plugin sees and reports it.

vLLM's hybrid KV cache coordinator already keeps, in one block pool, the MLA latent blocks of
every request (one block = `block_size` tokens of every MLA layer of a group) and the KDA state
slots (one block of a KDA group = one request's conv + recurrent state for every KDA layer of the
group). With prefix caching it runs the KDA groups in "align" mode: a request's state is carried
into a new block at each block boundary, so a prefix hit finds the KDA state saved at the last
cached boundary beside the MLA blocks of that prefix. The plugin reuses all of that; this module
owns what vLLM does not give us:

* `HybridStateLayout`: the layout in bytes and blocks (block size, bytes per KDA slot, MLA
  bytes per token, how many requests of max_model_len fit), logged once when the engine has
  sized its cache and returned to code by `engine_state()`;
* `StateUsage`: KDA slots and MLA blocks in use, free and cached blocks, prefix-cache hits,
  read from the scheduler's KV cache manager;
* `engine_state()`: what the engine-core utility `kimi_linear_state` returns (installed on
  vLLM's EngineCore by patches/engine_core.py, with the layout log line).
Runs in the engine-core process; vllm_kimi_linear.endpoints serves it over HTTP and /metrics.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HybridStateLayout:
    block_size: int  # tokens per MLA block; also the KDA state checkpoint interval (align mode)
    num_blocks: int  # blocks in the pool the groups share
    kda_groups: int
    mla_groups: int
    kda_layers: int
    mla_layers: int
    kda_slot_bytes: int  # one request's KDA state, all KDA layers, this GPU, unpadded
    mla_bytes_per_token: int  # all MLA layers, this GPU
    block_bytes: int  # one pool block across the layers of a group (KDA pages padded to it)
    max_model_len: int
    blocks_per_request: int  # at max_model_len, as vLLM counts it
    max_concurrency: float  # requests of max_model_len that fit (vLLM's own figure)
    kda_state_cache_mode: str  # "align" with prefix caching, else "none"

    def __post_init__(self):
        if self.block_size <= 0 or self.num_blocks < 0 or self.blocks_per_request <= 0:
            raise ValueError(f"inconsistent hybrid state layout: {self}")

    def summary(self) -> str:
        return (f"Kimi Linear state layout: {self.num_blocks} blocks of {self.block_size} tokens "
                f"({self.block_bytes} B each); KDA state {self.kda_slot_bytes} B per request "
                f"({self.kda_layers} layers, {self.kda_groups} slot group(s), cache mode "
                f"{self.kda_state_cache_mode}); MLA latent {self.mla_bytes_per_token} B per token "
                f"({self.mla_layers} layers); {self.blocks_per_request} blocks per request of "
                f"{self.max_model_len} tokens: {self.max_concurrency:.2f} such requests fit")


@dataclass(frozen=True)
class StateUsage:
    running_requests: int
    kda_slots_in_use: int  # KDA-group blocks held by requests (state slots incl. align copies)
    mla_blocks_in_use: int  # MLA-group blocks held by requests
    blocks_free: int  # free in the shared pool (includes cached blocks that can be evicted)
    blocks_cached: int  # free blocks that still hold a reusable prefix
    prefix_queries: int  # prompt tokens looked up in the prefix cache since start
    prefix_hits: int  # of those, tokens found

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def _is_kda_group(group) -> bool:
    from vllm.v1.kv_cache_interface import MambaSpec
    return isinstance(group.kv_cache_spec, MambaSpec)


def describe_layout(vllm_config, kv_cache_config) -> HybridStateLayout:
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config
    from vllm.v1.kv_cache_interface import MambaSpec

    groups = kv_cache_config.kv_cache_groups
    kda = [g for g in groups if _is_kda_group(g)]
    mla = [g for g in groups if not _is_kda_group(g)]
    block_size = mla[0].kv_cache_spec.block_size if mla else vllm_config.cache_config.block_size
    kda_layers = sum(len(g.layer_names) for g in kda)
    mla_layers = sum(len(g.layer_names) for g in mla)
    slot = kda[0].kv_cache_spec.state_content_size_bytes if kda else 0
    per_token = mla[0].kv_cache_spec.page_size_bytes // block_size if mla else 0
    group_size = max(len(g.layer_names) for g in groups)
    per_req = sum(math.ceil(g.kv_cache_spec.max_memory_usage_bytes(vllm_config)
                            / g.kv_cache_spec.page_size_bytes) for g in groups)
    mode = kda[0].kv_cache_spec.mamba_cache_mode if kda and isinstance(
        kda[0].kv_cache_spec, MambaSpec) else "none"
    return HybridStateLayout(
        block_size=block_size, num_blocks=kv_cache_config.num_blocks,
        kda_groups=len(kda), mla_groups=len(mla), kda_layers=kda_layers, mla_layers=mla_layers,
        kda_slot_bytes=slot * kda_layers, mla_bytes_per_token=per_token * mla_layers,
        block_bytes=groups[0].kv_cache_spec.page_size_bytes * group_size,
        max_model_len=vllm_config.model_config.max_model_len, blocks_per_request=per_req,
        max_concurrency=get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config),
        kda_state_cache_mode=mode)


def usage(scheduler) -> StateUsage:
    kvm = scheduler.kv_cache_manager
    pool = kvm.block_pool
    groups = kvm.kv_cache_config.kv_cache_groups
    in_use = {True: 0, False: 0}
    for group, manager in zip(groups, kvm.coordinator.single_type_managers):
        held = sum(1 for blocks in manager.req_to_blocks.values() for b in blocks if not b.is_null)
        in_use[_is_kda_group(group)] += held
    cached = sum(1 for b in pool.blocks if b.ref_cnt == 0 and b.block_hash is not None)
    q, h = getattr(kvm, "_kimi_prefix_totals", (0, 0))
    pending = kvm.prefix_cache_stats  # this step's, not yet handed to the front end
    if pending is not None:
        q, h = q + pending.queries, h + pending.hits
    return StateUsage(running_requests=len(scheduler.running), kda_slots_in_use=in_use[True],
                      mla_blocks_in_use=in_use[False], blocks_free=pool.get_num_free_blocks(),
                      blocks_cached=cached, prefix_queries=q, prefix_hits=h)


def engine_state(engine_core) -> dict:
    """What the `kimi_linear_state` utility returns: {"layout": ..., "usage": ...}."""
    layout = getattr(engine_core, "_kimi_layout", None)
    u = usage(engine_core.scheduler)
    return {"layout": asdict(layout) if layout else None,
            "usage": {**asdict(u), "prefix_hit_rate": u.prefix_hit_rate}}
