"""KDA operators against fla-core's naive references, run in float64, on fresh random inputs.

The CPU path ("torch") is checked at every shape; our Triton kernels ("triton") run the same
checks at small shapes under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU).
"""
from __future__ import annotations

import pytest
import torch

from kimi_kda.kda import chunk_kda, fused_recurrent_kda, kda_gate
from tests.kernels.reference import naive_references

naive_recurrent64, naive_chunk64, naive_kda_gate = naive_references()
BACKENDS = ["torch", "triton"]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(T, H, K, V, dtype=torch.float32, N=1, gmin=-30.0, seed=None, B=1):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2 ** 31)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q = r(B, T, H, K)
    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    # mostly mild decay, with a tail reaching gmin: every regime in one draw
    g = gmin * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) ** 4
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = r(max(N, B), H, K, V)
    return [x.to(dtype) for x in (q, k, v)] + [g.float(), beta.to(dtype)], h0.float()


def reference(q, k, v, g, beta, h0, cu=None):
    """fla's naive recurrence in float64, sequence by sequence."""
    x = [t.double() for t in (q, k, v, g, beta)]
    if cu is None:
        return naive_recurrent64(*x, initial_state=h0.double(), output_final_state=True)
    outs, states = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o, st = naive_recurrent64(*(t[:, s:e] for t in x), initial_state=h0[i:i + 1].double(),
                                  output_final_state=True)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1), torch.cat(states)


def check(o, s, ro, rs, tol):
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel(o, ro) <= tol, f"output rel err {rel(o, ro):.2e} > {tol}"
    assert rel(s, rs) <= tol, f"state rel err {rel(s, rs):.2e} > {tol}"


# (T, H, K, V): every T of the issue, each head count and K = V in {64, 128} and K != V
SHAPES = [(1, 1, 64, 64), (2, 3, 64, 64), (63, 4, 128, 128), (64, 3, 64, 32), (65, 4, 128, 128),
          (1000, 4, 64, 64), (1000, 1, 128, 64), (1000, 3, 32, 128), (8192, 4, 128, 128)]
SMALL = [(1, 1, 64, 64), (2, 3, 64, 64), (63, 2, 64, 32), (65, 1, 32, 64), (130, 2, 64, 64)]


@pytest.mark.parametrize("T,H,K,V", SHAPES)
def test_chunk_fp32_matches_naive(T, H, K, V):
    (q, k, v, g, beta), h0 = make(T, H, K, V)
    ro, rs = reference(q, k, v, g, beta, h0)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    check(o, s, ro, rs, 1e-4)


@pytest.mark.parametrize("T,H,K,V", [s for s in SHAPES if s[0] <= 1000])
def test_recurrent_fp32_matches_naive(T, H, K, V):
    (q, k, v, g, beta), h0 = make(T, H, K, V)
    ro, rs = reference(q, k, v, g, beta, h0)
    o, s = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    check(o, s, ro, rs, 1e-4)


@pytest.mark.parametrize("T,H,K,V", [(64, 4, 128, 128), (1000, 3, 64, 64), (8192, 4, 128, 128)])
def test_chunk_bf16_inputs(T, H, K, V):
    (q, k, v, g, beta), h0 = make(T, H, K, V, dtype=torch.bfloat16)
    ro, rs = reference(q, k, v, g, beta, h0)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    check(o, s, ro, rs, 2e-2)


def test_naive_chunk_agrees_with_naive_recurrent():
    """The two references agree with each other, so either one is a fair judge."""
    (q, k, v, g, beta), h0 = make(128, 2, 64, 64, dtype=torch.float64)
    a = naive_recurrent64(q, k, v, g.double(), beta, initial_state=h0.double(), output_final_state=True)
    b = naive_chunk64(q, k, v, g.double(), beta, initial_state=h0.double(), output_final_state=True)
    assert rel(b[0], a[0]) < 1e-10 and rel(b[1], a[1]) < 1e-10


@pytest.mark.parametrize("g_const", [-30.0, -1e-4])
def test_extreme_decay(g_const):
    """g = -30 everywhere (state forgotten each step) and g ~ 0 (nothing forgotten)."""
    (q, k, v, _, beta), h0 = make(200, 2, 64, 64)
    g = torch.full_like(q, g_const, dtype=torch.float32)
    ro, rs = reference(q, k, v, g, beta, h0)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    check(o, s, ro, rs, 1e-4)


@pytest.mark.parametrize("lens", [[1], [1, 1, 1], [5, 64, 1, 130], [1, 63, 64, 65, 200, 1, 7, 300]])
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_varlen(lens, op):
    H, K, V = 3, 64, 32
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    (q, k, v, g, beta), h0 = make(sum(lens), H, K, V, N=len(lens))
    ro, rs = reference(q, k, v, g, beta, h0, cu)
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    check(o, s, ro, rs, 1e-4)


def test_batch_without_initial_state_and_without_final_state():
    (q, k, v, g, beta), _ = make(100, 2, 64, 64, B=3)
    ro, _ = reference(q, k, v, g, beta, torch.zeros(3, 2, 64, 64))
    o, s = chunk_kda(q, k, v, g, beta, backend="torch")
    assert s is None
    assert rel(o, ro) <= 1e-4


def test_qk_l2norm_in_kernel():
    (q, k, v, g, beta), h0 = make(100, 2, 64, 64)
    q, k = q * 3, k * 5
    qn = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    kn = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    ro, rs = reference(qn, kn, v, g, beta, h0)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True, backend="torch")
        check(o, s, ro, rs, 1e-4)


def test_chunked_equals_recurrent():
    (q, k, v, g, beta), h0 = make(333, 4, 64, 64)
    a = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    b = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    check(a[0], a[1], b[0], b[1], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_anywhere_equals_whole(backend):
    """Chunked prefill relies on this: prefix then suffix with the state passed on == one piece."""
    T = 300 if backend == "torch" else 140
    (q, k, v, g, beta), h0 = make(T, 2, 64, 64)
    whole = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend)
    for cut in (1, 63, 64, 65, T - 1):
        a = chunk_kda(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True,
                      backend=backend)
        b = chunk_kda(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=a[1], output_final_state=True,
                      backend=backend)
        check(torch.cat([a[0], b[0]], 1), b[1], whole[0], whole[1], 1e-4)
    # and decode after prefill: the recurrent step continues the chunked state
    a = chunk_kda(*(x[:, :-1] for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True,
                  backend=backend)
    b = fused_recurrent_kda(*(x[:, -1:] for x in (q, k, v, g, beta)), initial_state=a[1],
                            output_final_state=True, backend=backend)
    check(b[0], b[1], whole[0][:, -1:], whole[1], 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_on_state_pool(backend):
    """Named slots are updated in place, padded (-1) entries skipped, every other slot untouched."""
    H, K, V, slots = 4, 64, 64, 11
    idx = torch.tensor([7, -1, 2, 9, -1, 0])
    B = idx.numel()
    (q, k, v, g, beta), _ = make(B, H, K, V)
    q, k, v, g, beta = (x.transpose(0, 1).contiguous() for x in (q, k, v, g, beta))   # [B, 1, ...]
    pool = torch.randn(slots, H, K, V)
    before = pool.clone()
    o, ret = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=idx, backend=backend)
    assert ret.data_ptr() == pool.data_ptr(), "the pool must be updated in place, not copied"
    named = idx[idx >= 0]
    untouched = [i for i in range(slots) if i not in named.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    assert (o[idx < 0] == 0).all()
    for b, slot in enumerate(idx.tolist()):
        if slot < 0:
            continue
        ro, rs = reference(*(x[b:b + 1] for x in (q, k, v, g, beta)), before[slot:slot + 1])
        check(o[b:b + 1], pool[slot:slot + 1], ro, rs, 1e-5)


@pytest.mark.parametrize("small_grid", [0, 10 ** 6])
def test_triton_decode_block_shapes(small_grid, monkeypatch):
    """The recurrent kernel's block shape follows the grid (BV=32 for few (sequence, head)
    programs, BV=64 for many): both shapes give the reference's decode on a state pool."""
    from kimi_kda.kda import triton_recurrent
    monkeypatch.setattr(triton_recurrent, "SMALL_GRID", small_grid)
    H, K, V = 2, 64, 128
    idx = torch.tensor([3, -1, 0])
    (q, k, v, g, beta), _ = make(idx.numel(), H, K, V, seed=5)
    q, k, v, g, beta = (x.transpose(0, 1).contiguous() for x in (q, k, v, g, beta))
    pool = torch.randn(5, H, K, V)
    before = pool.clone()
    o, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=idx, backend="triton")
    assert (o[1] == 0).all()
    for b, slot in ((0, 3), (2, 0)):
        ro, rs = reference(*(x[b:b + 1] for x in (q, k, v, g, beta)), before[slot:slot + 1])
        check(o[b:b + 1], pool[slot:slot + 1], ro, rs, 1e-5)


@pytest.mark.parametrize("T,H,K,V", SMALL)
def test_triton_matches_naive(T, H, K, V):
    (q, k, v, g, beta), h0 = make(T, H, K, V)
    ro, rs = reference(q, k, v, g, beta, h0)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="triton")
        check(o, s, ro, rs, 1e-4)


def test_triton_varlen_and_bf16():
    lens = [1, 70, 5, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    (q, k, v, g, beta), h0 = make(sum(lens), 2, 64, 32, N=len(lens), dtype=torch.bfloat16)
    ro, rs = reference(q, k, v, g, beta, h0, cu)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")
        check(o, s, ro, rs, 2e-2)


def test_triton_chunk_with_a_prebuilt_layout():
    """The layer's path: the chunk layout built on the host (as vLLM's metadata builder does,
    vllm_kimi_linear/kda_metadata.py) and handed in, so the call reads no device tensor."""
    from kimi_kda.kda.args import chunk_layout_host
    lens = [3, 130, 64, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    (q, k, v, g, beta), h0 = make(sum(lens), 2, 64, 32, N=len(lens))
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    layout = tuple(torch.tensor(x, dtype=torch.int32) for x in chunk_layout_host(bounds))
    assert torch.equal(layout[3], cu)
    ro, rs = reference(q, k, v, g, beta, h0, cu)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                     backend="triton", chunk_layout=layout)
    check(o, s, ro, rs, 1e-4)


def test_kda_gate_matches_naive():
    H, K = 4, 64
    f = torch.randn(3, 7, H * K) * 4
    A_log = torch.randn(H)
    dt_bias = torch.randn(H * K)
    ref = naive_kda_gate(f.view(3, 7, H, K), A_log, dt_bias)
    out = kda_gate(f, A_log, dt_bias)
    assert out.shape == (3, 7, H, K) and out.dtype == torch.float32
    assert rel(out, ref) < 1e-6
    assert (out <= 0).all()


def test_bad_shapes_are_clear_errors():
    (q, k, v, g, beta), h0 = make(10, 2, 64, 64)
    with pytest.raises(ValueError, match="beta must have shape"):
        chunk_kda(q, k, v, g, beta[..., :1])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_kda(q, k, v, g, beta, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="B must be 1"):
        chunk_kda(*(x.expand(2, *x.shape[1:]) for x in (q, k, v, g, beta)), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        chunk_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="float32"):
        chunk_kda(q, k, v, g, beta, initial_state=h0.bfloat16())
    with pytest.raises(ValueError, match="the pool has 3 slots"):
        fused_recurrent_kda(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1],
                            initial_state=torch.zeros(3, 2, 64, 64), ssm_state_indices=torch.tensor([5]))
    with pytest.raises(ValueError, match="unknown KDA backend"):
        chunk_kda(q, k, v, g, beta, backend="cuda-magic")
