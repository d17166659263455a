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
