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

import torch

from vllm.v1.attention.backends.gdn_attn import (GDNAttentionBackend, GDNAttentionMetadata,
                                                 GDNAttentionMetadataBuilder)

from .ops import chunk_layout_host


@dataclass
class KDAMetadata(GDNAttentionMetadata):
    # (chunk starts, chunk ends, first chunk per sequence, prefill cu_seqlens), device int32,
    # token positions relative to the first prefill token; None when the step has no prefill
    prefill_chunk_layout: tuple[torch.Tensor, ...] | None = None


def _to_device(values: list[int], device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class KDAMetadataBuilder(GDNAttentionMetadataBuilder):
    def _build_chunk_metadata(self, *args, **kwargs):
        return None, None  # fla's chunk indices: our kernels use prefill_chunk_layout instead

    def build(self, common_prefix_len, common_attn_metadata, num_accepted_tokens=None,
              num_decode_draft_tokens_cpu=None, fast_build=False) -> KDAMetadata:
        m = super().build(common_prefix_len, common_attn_metadata, num_accepted_tokens,
                          num_decode_draft_tokens_cpu, fast_build)
        layout = None
        if m.num_prefills:
            if m.spec_sequence_masks is not None:
                raise NotImplementedError("Kimi Linear (vllm-kimi-linear) does not support "
                                          "speculative decoding yet: serve without --speculative-config")
            qsl = common_attn_metadata.query_start_loc_cpu
            nd, npf = m.num_decodes, m.num_prefills
            starts = (qsl[nd:nd + npf + 1] - m.num_decode_tokens).tolist()  # host tensor: no sync
            bounds = list(zip(starts[:-1], starts[1:]))
            device = common_attn_metadata.query_start_loc.device
            layout = tuple(_to_device(x, device) for x in chunk_layout_host(bounds))
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(GDNAttentionMetadata)}
        return KDAMetadata(**fields, prefill_chunk_layout=layout)


class KDAAttentionBackend(GDNAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[KDAMetadataBuilder]:
        return KDAMetadataBuilder
