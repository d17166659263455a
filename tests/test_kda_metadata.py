"""The per-step prefill layout the KDA layers read (vllm_kimi_linear/kda_metadata.py): built on
the host from the query starts, one copy to the device, and what the Triton kernels then compute
with it equals what they compute deriving it themselves. (On CPU the engine runs the torch
paths, which ignore it, so this is where it is checked off the GPU.)"""
from __future__ import annotations

import torch

from kimi_kda.conv import causal_conv1d
from kimi_kda.kda.args import chunk_layout_host


def test_prefill_layout_matches_what_the_kernels_derive():
    from vllm_kimi_linear.kda_metadata import PrefillLayout
    lens = [3, 130, 0, 64, 1]
    starts = [0] + torch.tensor(lens).cumsum(0).tolist()
    lay = PrefillLayout.build(starts, torch.device("cpu"))
    assert all(t.dtype == torch.int32 for t in lay.chunk_layout + (lay.seq_of_token,))
    want = chunk_layout_host(list(zip(starts[:-1], starts[1:])))
    assert [t.tolist() for t in lay.chunk_layout] == [list(x) for x in want]
    cu = torch.tensor(starts, dtype=torch.int32)
    derived = torch.searchsorted(cu[1:], torch.arange(sum(lens), dtype=torch.int32), right=True)
    assert lay.seq_of_token.tolist() == derived.tolist()

    # the Triton conv given the layout's seq_of_token equals it deriving its own
    dim, W = 24, 4
    x, w = torch.randn(sum(lens), dim), torch.randn(dim, W)
    pool = torch.randn(8, dim, W - 1)
    slots, init = torch.tensor([1, 5, 2, 7, 0]), torch.tensor([True, False, True, True, False])
    p1, p2 = pool.clone(), pool.clone()
    y1 = causal_conv1d(x, w, cu, p1, slots, init, backend="triton", seq_of_token=lay.seq_of_token)
    y2 = causal_conv1d(x, w, cu, p2, slots, init, backend="triton")
    assert torch.equal(y1, y2) and torch.equal(p1, p2)


def _common(block_table, query_lens, seq_lens):
    from vllm.v1.attention.backend import CommonAttentionMetadata
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(query_lens), num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
        block_table_tensor=block_table,
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64))


def test_a_second_kda_group_reuses_the_first_groups_metadata(tiny_model_dir):
    """vLLM's GPU runner builds a step's metadata for the first KV cache group of KDA layers and
    hands it to the others through update_block_table (the builder opts in on CUDA): what a later
    group gets that way must equal what building it would give, prefill layout included."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import MambaSpec

    from vllm_kimi_linear.kda_metadata import KDAMetadata, KDAMetadataBuilder
    from vllm_kimi_linear.layers.kda import kda_state_dtype, kda_state_shape
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    # (without prefix caching: the block table's column 0 is the slot; with it, the GPU runner
    # supplies each group's aligned slots itself)
    cfg = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=2048,
                     enable_prefix_caching=False).create_engine_config()
    spec = MambaSpec(block_size=cfg.cache_config.block_size, shapes=kda_state_shape(cfg),
                     dtypes=kda_state_dtype(cfg), mamba_type=MambaAttentionBackendEnum.GDN_ATTN)
    builder = KDAMetadataBuilder(spec, ["model.layers.0.self_attn"], cfg, torch.device("cpu"))
    assert not builder.supports_update_block_table  # vLLM's CPU runner builds every group

    # two decodes, then two prefills (one a continued chunk); two groups' block tables
    query_lens, seq_lens = [1, 1, 70, 5], [9, 40, 70, 21]
    first, second = torch.tensor([[3], [4], [5], [6]]), torch.tensor([[11], [12], [13], [14]])
    built = builder.build(0, _common(first, query_lens, seq_lens))
    reused = builder.update_block_table(built, second, torch.zeros(77, dtype=torch.int64))
    direct = builder.build(0, _common(second, query_lens, seq_lens))
    assert isinstance(reused, KDAMetadata) and reused.prefill_layout is built.prefill_layout
    assert reused.non_spec_state_indices_tensor.tolist() == [11, 12, 13, 14]
    for f in ("num_decodes", "num_decode_tokens", "num_prefills", "num_prefill_tokens"):
        assert getattr(reused, f) == getattr(direct, f)
    for f in ("non_spec_state_indices_tensor", "has_initial_state", "non_spec_query_start_loc"):
        assert torch.equal(getattr(reused, f), getattr(direct, f)), f
    assert [t.tolist() for t in reused.prefill_layout.chunk_layout] == \
        [t.tolist() for t in direct.prefill_layout.chunk_layout]


def test_the_builder_opts_in_on_vllms_gpu_runner_only(monkeypatch):
    """The opt-in itself (CUDA and vLLM's V2 runner: the runner that reuses metadata across
    groups), with vLLM's own constructor stubbed, as its buffers need a GPU."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadataBuilder

    from vllm_kimi_linear.kda_metadata import KDAMetadataBuilder
    monkeypatch.setattr(GDNAttentionMetadataBuilder, "__init__",
                        lambda self, *args: setattr(self, "supports_update_block_table", False))
    for v2, device, reuses in ((True, "cuda", True), (False, "cuda", False), (True, "cpu", False)):
        b = KDAMetadataBuilder(None, [], SimpleNamespace(use_v2_model_runner=v2), torch.device(device))
        assert b.supports_update_block_table is reuses, (v2, device)
        # the runner fills each group's aligned state indices in where the attribute exists
        assert hasattr(b, "mamba_aligned_state_indices") is reuses
