"""The per-step batch view the KDA layers read: vLLM's GDN metadata plus our prefill chunk layout.

vLLM builds GDNAttentionMetadata once per step for every KDA layer (decodes first, then
prefills; slots, initial-state flags, query starts). Our chunked-prefill kernel also needs the
chunk layout of the prefill part (chunk starts/ends, each sequence's first chunk), which depends
on the sequence lengths: computed here, on the host copy of the query starts the builder already
has, and copied to the device without waiting. So the layer's forward never reads a device
tensor on the host, and can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.attention.backends.gdn_attn import (GDNAttentionBackend, GDNAttentionMetadata,
                                                 GDNAttentionMetadataBuilder)

from .ops import chunk_layout_host


@dataclass
class PrefillLayout:
    """The prefill part of a step as our kernels index it: device int32 tensors, token positions
    relative to the first prefill token (views of one host-to-device copy)."""
    chunk_starts: torch.Tensor  # first token of each chunk of 64
    chunk_ends: torch.Tensor  # the end of each chunk's sequence
    first_chunk: torch.Tensor  # [N + 1] each sequence's first chunk
    cu_seqlens: torch.Tensor  # [N + 1] sequence bounds
    seq_of_token: torch.Tensor  # [T] the sequence of each prefill token (for the conv)

    @property
    def chunk_layout(self) -> tuple[torch.Tensor, ...]:
        """What `chunk_kda(..., chunk_layout=)` takes."""
        return self.chunk_starts, self.chunk_ends, self.first_chunk, self.cu_seqlens

    @classmethod
    def build(cls, starts: list[int], device) -> "PrefillLayout":
        """From the prefill sequences' cumulative starts [N + 1] (host ints, starting at 0)."""
        lists = list(chunk_layout_host(list(zip(starts[:-1], starts[1:]))))
        lists.append(np.repeat(np.arange(len(starts) - 1), np.diff(starts)).tolist())
        flat = async_tensor_h2d([v for x in lists for v in x], device=device, dtype=torch.int32)
        return cls(*flat.split([len(x) for x in lists]))


@dataclass
class KDAMetadata(GDNAttentionMetadata):
    prefill_layout: PrefillLayout | None = None  # None when the step has no prefill


class KDAMetadataBuilder(GDNAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # vLLM's GPU model runner (V2) builds a step's GDN metadata once and hands it to the other
        # KV cache groups of KDA layers, which only re-gather their state indices
        # (update_block_table); it opts in vLLM's own builder class alone, as a subclass may add
        # per-group fields. Ours adds prefill_layout, a function of the query starts alone, so the
        # reuse holds for it: one build per step instead of one per group (3 at 48B), as vLLM's
        # in-tree Kimi Linear has, and the runner computes every group's aligned state indices
        # (prefix caching) in one go instead of a gather per group.
        if vllm_config.use_v2_model_runner and torch.device(device).type == "cuda":
            self.supports_update_block_table = True
            self.mamba_aligned_state_indices = None  # the runner fills it in each step

    def _build_chunk_metadata(self, *args, **kwargs):
        return None, None  # fla's chunk indices: our kernels use prefill_layout instead

    def build(self, common_prefix_len, common_attn_metadata, num_accepted_tokens=None,
              num_decode_draft_tokens_cpu=None, fast_build=False) -> KDAMetadata:
        m = super().build(common_prefix_len, common_attn_metadata, num_accepted_tokens,
                          num_decode_draft_tokens_cpu, fast_build)
        layout = None
        if m.num_prefills:  # (no spec decodes here: the config hook refuses --speculative-config)
            qsl = common_attn_metadata.query_start_loc_cpu  # host tensor: no sync
            nd, npf = m.num_decodes, m.num_prefills
            layout = PrefillLayout.build((qsl[nd:nd + npf + 1] - m.num_decode_tokens).tolist(),
                                         common_attn_metadata.query_start_loc.device)
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(GDNAttentionMetadata)}
        return KDAMetadata(**fields, prefill_layout=layout)


class KDAAttentionBackend(GDNAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[KDAMetadataBuilder]:
        return KDAMetadataBuilder
