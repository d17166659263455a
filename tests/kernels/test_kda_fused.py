"""chunk_kda with the pre-processing in the kernels (fla's `use_gate_in_kernel`,
`use_beta_sigmoid_in_kernel`, `use_qk_l2norm_in_kernel`), against fla-core's naive references in
float64: `naive_kda_gate` on the raw gate projection, sigmoid, l2norm, then `naive_recurrent_kda`.

Inputs are the layer's raw tensors (unnormalised q and k, the gate projection f, beta logits),
fresh random draws each run. The torch backend is checked at more shapes; the Triton kernels at
small ones (TRITON_INTERPRET=1 without a GPU, see tests/conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kimi_kda.kda import chunk_kda
from tests.kernels.reference import naive_kda_gate64
from tests.kernels.test_kda_ops import check, reference, rel

FUSED = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_raw(T, H, K, V, dtype=torch.float32, N=1, B=1, seed=None, bias=True):
    """What the layer has before the kernel: q, k at arbitrary scale, v, the gate projection f,
    beta logits, the gate's A_log [H] and dt_bias [H*K] (fp32 parameters), fp32 states."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2 ** 31)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q = r(B, T, H, K) * 3
    k = r(B, T, H, K) * 0.5
    v = r(B, T, H, V)
    f = r(B, T, H, K) * 2           # softplus sees everything from ~0 to its linear range
    b = r(B, T, H) * 2
    # Kimi's init: exp(A_log) uniform in [1, 16]; per-step log-decays from ~0 down to about -100
    A_log = torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=gen).log().float()
    dt_bias = (r(H * K) - 2).float() if bias else None
    h0 = r(max(N, B), H, K, V).float()
    return [x.to(dtype) for x in (q, k, v, f, b)], A_log, dt_bias, h0


def l2norm64(x):
    """fla's l2norm (x / sqrt(sum(x^2) + 1e-6)), in float64."""
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu=None, gate=naive_kda_gate64):
    """fla's naive ops in float64: gate, sigmoid, l2norm, then the recurrence per sequence."""
    g = gate(f.double(), A_log.double(), None if dt_bias is None else dt_bias.double())
    return reference(l2norm64(q), l2norm64(k), v.double(), g, b.double().sigmoid(), h0, cu)


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


# (lens, H, K, V, dtype): packed sequences of several lengths (around the 64-token chunk and its
# 16-token blocks), K != V, float32 and bf16
TORCH_CASES = [([1, 63, 64, 65, 200, 7], 3, 64, 32, torch.float32),
               ([130, 1, 300], 4, 128, 128, torch.float32),
               ([1000], 2, 64, 64, torch.float32),
               ([1, 63, 64, 65, 200, 7], 3, 64, 32, torch.bfloat16),
               ([500, 17, 129], 4, 128, 128, torch.bfloat16)]


@pytest.mark.parametrize("lens,H,K,V,dtype", TORCH_CASES)
def test_fused_torch_matches_naive(lens, H, K, V, dtype):
    cu = cu_of(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(sum(lens), H, K, V, dtype, N=len(lens))
    ro, rs = fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu)
    o, s = chunk_kda(q, k, v, f, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                     A_log=A_log, dt_bias=dt_bias, backend="torch", **FUSED)
    assert o.dtype == dtype and s.dtype == torch.float32
    check(o, s, ro, rs, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_triton_matches_naive_varlen(dtype):
    """Packed sequences crossing chunk and block borders, initial and final states."""
    lens = [1, 70, 5, 64, 17]
    cu = cu_of(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(sum(lens), 2, 64, 32, dtype, N=len(lens))
    ro, rs = fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu)
    o, s = chunk_kda(q, k, v, f, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                     A_log=A_log, dt_bias=dt_bias, backend="triton", **FUSED)
    assert o.dtype == dtype and s.dtype == torch.float32
    check(o, s, ro, rs, TOL[dtype])


def test_fused_triton_batch_without_bias():
    """Fixed-length batch (chunk bounds computed in the kernels), no dt_bias (fla allows None)."""
    (q, k, v, f, b), A_log, _, h0 = make_raw(65, 3, 32, 64, B=2, bias=False)
    ro, rs = fused_reference(q, k, v, f, b, A_log, None, h0)
    o, s = chunk_kda(q, k, v, f, b, initial_state=h0, output_final_state=True,
                     A_log=A_log, backend="triton", **FUSED)
    check(o, s, ro, rs, 1e-4)


def test_fused_triton_layer_call():
    """The layer's call: q, k, v are views of one [T, 3HK] conv output (token stride 3HK, used as
    is), the chunk layout is built on the host ahead, bf16 inputs, fp32 states in and out."""
    from kimi_kda.kda.args import chunk_layout_host
    lens = [3, 130, 64, 1]
    H, D = 2, 64
    cu = cu_of(lens).to(torch.int32)
    T = sum(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(T, H, D, D, torch.bfloat16, N=len(lens))
    qkv = torch.cat([x.reshape(T, H * D) for x in (q, k, v)], -1)     # the conv output
    qs, ks, vs = (x.view(1, T, H, D) for x in qkv.split(H * D, dim=-1))
    assert qs.stride(1) == 3 * H * D and not qs.is_contiguous()
    from kimi_kda.rows import token_rows
    assert token_rows(qs, T).data_ptr() == qs.data_ptr()  # used as is, not copied
    layout = tuple(torch.tensor(x, dtype=torch.int32) for x in chunk_layout_host(list(zip(cu[:-1].tolist(),
                                                                                       cu[1:].tolist()))))
    o, s = chunk_kda(qs, ks, vs, f, b, scale=D ** -0.5, initial_state=h0, output_final_state=True,
                     cu_seqlens=cu, A_log=A_log, dt_bias=dt_bias, backend="triton", chunk_layout=layout,
                     **FUSED)
    ro, rs = fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu)
    check(o, s, ro, rs, 2e-2)
    # the strided views give what contiguous copies give
    o2, s2 = chunk_kda(q, k, v, f, b, scale=D ** -0.5, initial_state=h0, output_final_state=True,
                       cu_seqlens=cu, A_log=A_log, dt_bias=dt_bias, backend="triton", **FUSED)
    assert rel(o, o2) < 1e-6 and rel(s, s2) < 1e-6


def test_fused_equals_preprocessing_first():
    """Fused Triton == the old call: kda_gate, sigmoid and l2norm first, then chunk_kda on their
    outputs. (The torch backend's fused path is that very pre-processing: nothing to compare.)"""
    backend = "triton"
    from kimi_kda.kda import kda_gate
    lens = [40, 90]
    cu = cu_of(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(sum(lens), 2, 64, 64, N=2)
    o, s = chunk_kda(q, k, v, f, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                     A_log=A_log, dt_bias=dt_bias, backend=backend, **FUSED)
    o2, s2 = chunk_kda(q, k, v, kda_gate(f, A_log, dt_bias), b.sigmoid(), initial_state=h0,
                       output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True, backend=backend)
    check(o, s, o2, s2, 1e-5)


def _relu_gate(f, A_log, dt_bias):
    return -A_log.exp().view(-1, 1) * F.relu(f + dt_bias.view(f.shape[-2:]))


def _no_bias_gate(f, A_log, dt_bias):
    return naive_kda_gate64(f, A_log, None)


def _inverted_a_gate(f, A_log, dt_bias):
    return naive_kda_gate64(f, -A_log, dt_bias)   # exp(-A_log): a rate in [1/16, 1], not [1, 16]


def test_a_wrong_gate_fails_the_check():
    """The tolerance discriminates: the same output judged against references built with a
    wrong gate (relu for softplus, dt_bias dropped, exp(-A_log)) fails, the right one passes.
    (What is judged is the references, so one backend, the fast one, is enough.)"""
    backend = "torch"
    lens = [70, 30]
    cu = cu_of(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(sum(lens), 2, 64, 32, N=2)
    o, s = chunk_kda(q, k, v, f, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                     A_log=A_log, dt_bias=dt_bias, backend=backend, **FUSED)
    ro, rs = fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu)
    check(o, s, ro, rs, 1e-4)
    for wrong in (_relu_gate, _no_bias_gate, _inverted_a_gate):
        wo, ws = fused_reference(q, k, v, f, b, A_log, dt_bias, h0, cu, gate=wrong)
        err = max(rel(o, wo), rel(s, ws))
        assert err > 1e-2, f"{wrong.__name__}: the check cannot tell it from the right gate ({err:.1e})"
    # and a wrong sigmoid (beta used as given) or a missing l2norm are caught as well
    g = naive_kda_gate64(f, A_log, dt_bias)
    wo, ws = reference(l2norm64(q), l2norm64(k), v, g, b.double(), h0, cu)
    assert max(rel(o, wo), rel(s, ws)) > 1e-2
    wo, ws = reference(q / math.sqrt(64), l2norm64(k), v, g, b.double().sigmoid(), h0, cu)
    assert max(rel(o, wo), rel(s, ws)) > 1e-2


def test_reference_gate_is_float64():
    """The judge itself: fla's naive_kda_gate run in float64 equals the formula in float64."""
    f, A_log, dt_bias = torch.randn(5, 3, 16) * 8, torch.randn(3), torch.randn(48)
    g = naive_kda_gate64(f, A_log, dt_bias)
    want = -A_log.double().exp().view(3, 1) * F.softplus(f.double() + dt_bias.double().view(3, 16))
    assert g.dtype == torch.float64 and rel(g, want) < 1e-14


def test_gate_argument_errors():
    (q, k, v, f, b), A_log, dt_bias, _ = make_raw(10, 2, 64, 64)
    with pytest.raises(ValueError, match="needs A_log"):
        chunk_kda(q, k, v, f, b, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="A_log must have H=2 elements"):
        chunk_kda(q, k, v, f, b, use_gate_in_kernel=True, A_log=torch.zeros(3))
    with pytest.raises(ValueError, match=r"dt_bias must have H\*K = 2\*64 = 128 elements"):
        chunk_kda(q, k, v, f, b, use_gate_in_kernel=True, A_log=A_log, dt_bias=torch.zeros(64))
    with pytest.raises(ValueError, match="use_gate_in_kernel=True"):
        chunk_kda(q, k, v, f, b, A_log=A_log, dt_bias=dt_bias)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="A_log must have"):
            chunk_kda(q, k, v, f, b, use_gate_in_kernel=True, A_log=torch.zeros(2, 2), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_recurrent_decode_on_a_pool_matches_naive(backend, bias):
    """The layer's decode call: one token per sequence, raw gate projection and beta logits,
    states read and written in place in a pool at the named slots; a padded entry (slot -1) is
    skipped and its output is 0."""
    from kimi_kda.kda import fused_recurrent_kda
    N, H, K, V = 4, 3, 64, 32
    (q, k, v, f, b), A_log, dt_bias, _ = make_raw(N, H, K, V, N=N, bias=bias)
    q, k, v, f, b = (x.reshape(N, 1, *x.shape[2:]) for x in (q, k, v, f, b))
    pool = torch.randn(7, H, K, V)
    slots = torch.tensor([5, 0, -1, 2])
    before = pool.clone()
    o, _ = fused_recurrent_kda(q, k, v, f, b, initial_state=pool, ssm_state_indices=slots,
                               A_log=A_log, dt_bias=dt_bias, backend=backend, **FUSED)
    for n, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert (o[n] == 0).all()
            continue
        ro, rs = fused_reference(q[n:n + 1], k[n:n + 1], v[n:n + 1], f[n:n + 1], b[n:n + 1], A_log,
                                 dt_bias, before[slot:slot + 1])
        check(o[n:n + 1], pool[slot:slot + 1], ro, rs, 1e-4)
    untouched = [i for i in range(7) if i not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_recurrent_decode_reads_strided_views_and_writes_out_in_place(backend):
    """The layer's decode call as it makes it: q/k/v are column blocks of one [N, 3*H*K] conv
    output, beta a column block of a wider projection, and the output is a slice of the layer's
    buffer. The result equals the call on contiguous copies, lands in that buffer, and the Triton
    kernel reads the views as they are (a copy there would be a kernel launch per tensor)."""
    from kimi_kda.kda import fused_recurrent_kda
    N, H, K = 5, 3, 32
    (q, k, v, f, b), A_log, dt_bias, _ = make_raw(N, H, K, K, N=N, seed=7)
    as_decode = lambda x: x.reshape(N, 1, *x.shape[2:])  # noqa: E731
    q, k, v, f, b = (as_decode(x) for x in (q, k, v, f, b))
    packed = torch.cat([x.reshape(N, H * K) for x in (q, k, v)], dim=1)  # the conv output
    wide = torch.cat([torch.randn(N, 2), b.reshape(N, H), torch.randn(N, 4)], dim=1)
    qs, ks, vs = (t.reshape(N, 1, H, K) for t in packed.split(H * K, dim=1))
    bs = wide[:, 2:2 + H].reshape(N, 1, H)
    assert not qs.is_contiguous() and not bs.is_contiguous()
    slots = torch.tensor([3, 0, -1, 6, 1])
    pool = torch.randn(8, H, K, K)
    buf = torch.full((N + 2, H, K), 7.0)  # rows past N stay as they were
    pool_a, pool_b = pool.clone(), pool.clone()
    want, _ = fused_recurrent_kda(q, k, v, f, b, initial_state=pool_a, ssm_state_indices=slots,
                                  A_log=A_log, dt_bias=dt_bias, backend=backend, **FUSED)
    got, _ = fused_recurrent_kda(qs, ks, vs, f, bs, initial_state=pool_b, ssm_state_indices=slots,
                                 A_log=A_log, dt_bias=dt_bias, backend=backend,
                                 out=buf[:N].view(N, 1, H, K), **FUSED)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:N].view(N, 1, H, K), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool_b, pool_a, rtol=1e-5, atol=1e-6)
    assert (buf[N:] == 7.0).all()
    if backend == "triton":
        from kimi_kda.rows import token_rows
        assert token_rows(qs, N).data_ptr() == qs.data_ptr() and token_rows(bs, N).data_ptr() == bs.data_ptr()
    with pytest.raises(ValueError, match="out must"):
        fused_recurrent_kda(q, k, v, f, b, initial_state=pool.clone(), ssm_state_indices=slots,
                            A_log=A_log, dt_bias=dt_bias, backend=backend,
                            out=torch.empty(N, 2, H, K), **FUSED)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_writes_out_in_place(backend):
    """The layer's prefill call hands `out`, rows of its own buffer: the result lands there (the
    Triton kernel writes it, no copy), is what the call without `out` returns, and leaves the
    buffer's other rows alone; an `out` of the wrong shape or dtype is refused, and on Triton one
    that is not contiguous."""
    lens = [3, 70]
    T, H, D = sum(lens), 2, 32
    cu = cu_of(lens)
    (q, k, v, f, b), A_log, dt_bias, h0 = make_raw(T, H, D, D, N=len(lens), seed=3)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, A_log=A_log, dt_bias=dt_bias,
              backend=backend, **FUSED)
    want, want_s = chunk_kda(q, k, v, f, b, **kw)
    buf = torch.full((T + 3, H, D), 7.0)
    got, got_s = chunk_kda(q, k, v, f, b, out=buf[1:T + 1].view(1, T, H, D), **kw)
    assert got.data_ptr() == buf[1].data_ptr()
    torch.testing.assert_close(buf[1:T + 1].view(1, T, H, D), want, rtol=0, atol=0)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
    assert (buf[0] == 7.0).all() and (buf[T + 1:] == 7.0).all()
    bad = [torch.empty(1, T, H, D + 1), torch.empty(1, T, H, D, dtype=torch.float64)]
    if backend == "triton":  # (the torch backend copies its result into any layout)
        bad.append(torch.empty(1, T, H, 2 * D)[..., ::2])
    for bad in bad:
        with pytest.raises(ValueError, match="out must"):
            chunk_kda(q, k, v, f, b, out=bad, **kw)
