"""The short causal conv against torch's own conv1d, for prefill, slot updates and splits.

Each check runs on both backends: "torch" (the CPU path) and "triton" (the GPU kernels, here
under TRITON_INTERPRET=1 when there is no GPU, as tests/conftest.py sets).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_kda.conv import causal_conv1d, causal_conv1d_update


def conv_reference(x, weight, prefix):
    """One sequence: F.conv1d over [prefix | x] (prefix = the width-1 earlier inputs), SiLU."""
    W = weight.shape[1]
    state = torch.cat([prefix, x])[-(W - 1):]
    if x.shape[0] == 0:
        return x.double(), state
    xp = torch.cat([prefix, x]).t().unsqueeze(0)                      # [1, dim, W-1+L]
    y = F.conv1d(xp.double(), weight.double().unsqueeze(1), groups=weight.shape[0])
    return F.silu(y[0].t())[-x.shape[0]:], state


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[1], [7], [1, 2, 3, 40], [100, 1, 5], [2, 0, 70, 1]])
@pytest.mark.parametrize("width", [2, 4])
def test_prefill_varlen_with_initial_states(lens, width, backend):
    dim, slots = 24, 9
    x = torch.randn(sum(lens), dim)
    weight = torch.randn(dim, width)
    pool = torch.randn(slots, dim, width - 1)
    before = pool.clone()
    idx = torch.tensor([8, 1, 4, 6][: len(lens)])
    has_init = torch.tensor([True, False, True, True][: len(lens)])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    y = causal_conv1d(x, weight, cu, pool, idx, has_init, backend=backend)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        prefix = before[idx[i]].t() if has_init[i] else torch.zeros(width - 1, dim)
        ry, rstate = conv_reference(x[s:e], weight, prefix)
        torch.testing.assert_close(y[s:e].double(), ry, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[idx[i]].t(), rstate.float())
    others = [i for i in range(slots) if i not in idx.tolist()]
    assert torch.equal(pool[others], before[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_on_slots_skips_padding_and_matches_prefill(backend):
    """Prefill of T tokens then one-token updates == prefill of T + n tokens in one piece."""
    dim, W, slots = 16, 4, 5
    weight = torch.randn(dim, W)
    x = torch.randn(13, dim)
    pool = torch.zeros(slots, dim, W - 1)
    whole = causal_conv1d(x, weight, None, pool.clone(), torch.tensor([0]), torch.tensor([False]),
                          backend=backend)
    causal_conv1d(x[:10], weight, None, pool, torch.tensor([3]), torch.tensor([False]), backend=backend)
    for t in range(10, 13):
        idx = torch.tensor([-1, 3, -1])
        before = pool.clone()
        y = causal_conv1d_update(torch.stack([torch.randn(dim), x[t], torch.randn(dim)]), weight, pool, idx,
                                 backend=backend)
        torch.testing.assert_close(y[1], whole[t], rtol=1e-5, atol=1e-5)
        assert (y[0] == 0).all() and (y[2] == 0).all()
        untouched = [0, 1, 2, 4]
        assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_state_view_works(backend):
    """vLLM keeps conv states as [slots, width-1, dim]; a transposed view must be accepted."""
    dim, W = 8, 4
    storage = torch.randn(3, W - 1, dim)
    view = storage.transpose(1, 2)
    weight = torch.randn(dim, W)
    x = torch.randn(2, dim)
    expect = view.clone()
    y = causal_conv1d_update(x, weight, view, torch.tensor([2, 0]), backend=backend)
    ref = causal_conv1d_update(x, weight, expect, torch.tensor([2, 0]), backend="torch")
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(storage.transpose(1, 2), expect)


def test_bad_shapes():
    with pytest.raises(ValueError, match="conv states must be"):
        causal_conv1d_update(torch.randn(2, 8), torch.randn(8, 4), torch.randn(3, 8, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="past the 3 conv-state slots"):
        causal_conv1d_update(torch.randn(1, 8), torch.randn(8, 4), torch.randn(3, 8, 3), torch.tensor([3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_on_transposed_bf16_state_with_padded_slot(backend):
    """The layer's case: a [slots, width-1, dim] bf16 pool seen transposed, fp32 inputs, and a
    sequence with a negative slot (padding): it reads zeros and writes nothing."""
    dim, W, slots = 40, 4, 6
    storage = torch.randn(slots, W - 1, dim).bfloat16()
    pool = storage.transpose(1, 2)
    before = pool.clone()
    x = torch.randn(9, dim).bfloat16().float()
    weight = torch.randn(dim, W)
    cu = torch.tensor([0, 2, 7, 9])
    idx = torch.tensor([5, -1, 2])
    has_init = torch.tensor([True, True, False])
    y = causal_conv1d(x, weight, cu, pool, idx, has_init, backend=backend)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        prefix = before[idx[i]].t().float() if idx[i] >= 0 and has_init[i] else torch.zeros(W - 1, dim)
        ry, rstate = conv_reference(x[s:e], weight, prefix)
        torch.testing.assert_close(y[s:e].double(), ry, rtol=1e-5, atol=1e-5)
        if idx[i] >= 0:
            torch.testing.assert_close(pool[idx[i]].t().float(), rstate.float())
    assert torch.equal(pool[[0, 1, 3, 4]], before[[0, 1, 3, 4]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_block_of_a_wider_tensor_is_read_in_place(backend):
    """The layer's conv input is the q|k|v column block of its input GEMM's output (token stride
    wider than dim): prefill and update give what they give on a contiguous copy, the output is
    a dense [T, dim], and the Triton path reads the view without copying it first."""
    dim, W = 24, 4
    weight = torch.randn(dim, W)
    wide = torch.randn(9, dim + 5)
    x = wide[:, 2:2 + dim]
    assert not x.is_contiguous()
    pool_a, pool_b = torch.randn(3, dim, W - 1), None
    pool_b = pool_a.clone()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    slots, init = torch.tensor([2, 0]), torch.tensor([True, False])
    got = causal_conv1d(x, weight, cu, pool_a, slots, init, backend=backend)
    want = causal_conv1d(x.contiguous(), weight, cu, pool_b, slots, init, backend=backend)
    assert got.shape == (9, dim) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(pool_a, pool_b, rtol=0, atol=0)
    step = causal_conv1d_update(x[:2], weight, pool_a, slots, backend=backend)
    step_want = causal_conv1d_update(x[:2].contiguous(), weight, pool_b, slots, backend=backend)
    torch.testing.assert_close(step, step_want, rtol=0, atol=0)
    torch.testing.assert_close(pool_a, pool_b, rtol=0, atol=0)
    if backend == "triton":
        from kimi_kda.rows import token_rows
        assert token_rows(x, x.shape[0]).data_ptr() == x.data_ptr()
