"""The KDA layer's profile-run prefill (`KimiDeltaAttention._profile_prefill`): vLLM's profile run
gives the layer no metadata, and the layer then runs its prefill once per process over the run's
tokens into scratch state slots, so the Triton kernels compile before the first request and the
prefill's intermediates count in vLLM's activation peak. Run here with the layer's own `_prefill`
on both kernel backends (Triton under the interpreter), on a stand-in for the layer's attributes."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from vllm_kimi_linear.layers import kda as kda_layer
from vllm_kimi_linear.layers.kda import KimiDeltaAttention


def stand_in(H=2, D=32, K=4):
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(dtype=torch.float32),
        cache_config=SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype="auto"))
    layer = SimpleNamespace(heads=H, head_dim=D, vllm_config=vllm_config,
                            dims=SimpleNamespace(num_heads=H, head_dim=D, short_conv_kernel_size=K),
                            qkv_conv1d=SimpleNamespace(weight=torch.randn(3 * H * D, K)),
                            A_log=torch.randn(H), dt_bias=torch.randn(H * D),
                            kv_cache=(torch.tensor([]), torch.tensor([])))
    for name in ("_prefill", "_heads", "_profile_prefill"):
        setattr(layer, name, functools.partial(getattr(KimiDeltaAttention, name), layer))
    layer._state_views = KimiDeltaAttention._state_views
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_profile_run_prefill_runs_once_into_scratch_slots(backend, monkeypatch):
    monkeypatch.setenv("KDA_BACKEND", backend)
    monkeypatch.setenv("KDA_CONV_BACKEND", backend)
    monkeypatch.setattr(KimiDeltaAttention, "_profiled", False)
    calls = []
    real_chunk = kda_layer.chunk_kda

    def counting_chunk(*a, **kw):
        calls.append(kw["initial_state"].shape)
        o, final = real_chunk(*a, **kw)
        assert torch.isfinite(o).all() and torch.isfinite(final).all()
        return o, final

    monkeypatch.setattr(kda_layer, "chunk_kda", counting_chunk)
    layer = stand_in()
    T, HD = 70, layer.heads * layer.head_dim
    wide = torch.randn(T, 3 * HD + 5)  # the input GEMM's output: q|k|v columns, then others
    qkv, f, b = wide[:, :3 * HD], torch.randn(T, layer.heads, layer.head_dim), torch.randn(T, layer.heads)
    before = wide.clone()
    layer._profile_prefill(qkv, f, b)
    assert calls == [(1, layer.heads, layer.head_dim, layer.head_dim)]  # one sequence, from zeros
    assert KimiDeltaAttention._profiled
    assert torch.equal(wide, before)  # inputs untouched
    layer._profile_prefill(qkv, f, b)  # once per process: every KDA layer has the same shapes
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_core_writes_every_row_of_an_uninitialised_output(backend, monkeypatch):
    """The layer hands `_core` torch.empty (no fill kernel a layer a step): decode rows, prefill
    rows, a negative (padding) slot's row and the rows past the batch's tokens must all be
    written, the last two as zeros; without metadata (profile/dummy runs) every row is zero."""
    from vllm_kimi_linear.kda_metadata import PrefillLayout
    monkeypatch.setenv("KDA_BACKEND", backend)
    monkeypatch.setenv("KDA_CONV_BACKEND", backend)
    monkeypatch.setattr(KimiDeltaAttention, "_profiled", True)  # no profile-run prefill here
    layer = stand_in()
    H, D, K = layer.heads, layer.head_dim, 4
    layer.prefix = "model.layers.0.self_attn"
    layer.kv_cache = (torch.randn(4, K - 1, 3 * H * D), torch.randn(4, H, D, D))  # 4 slots
    layer._core = functools.partial(KimiDeltaAttention._core, layer)
    nd, prompt, pad = 3, 9, 4  # decodes (slots 1, 2 and a padding -1), one prompt, padding rows
    T = nd + prompt + pad
    qkv, f, b = torch.randn(T, 3 * H * D), torch.randn(T, H, D), torch.randn(T, H)
    m = SimpleNamespace(non_spec_state_indices_tensor=torch.tensor([1, 2, -1, 3], dtype=torch.int32),
                        num_decodes=nd, num_decode_tokens=nd, num_prefills=1, num_prefill_tokens=prompt,
                        has_initial_state=torch.tensor([False, False, False, True]),
                        prefill_layout=PrefillLayout.build([0, prompt], "cpu"))
    ctx = SimpleNamespace(attn_metadata={layer.prefix: m})
    monkeypatch.setattr(kda_layer, "get_forward_context", lambda: ctx)
    out = torch.full((T, H, D), float("nan"))
    layer._core(qkv, f, b, out)
    assert torch.isfinite(out).all()
    assert out[:2].abs().sum() > 0 and out[nd:nd + prompt].abs().sum() > 0
    assert torch.equal(out[2], torch.zeros(H, D)) and torch.equal(out[nd + prompt:], torch.zeros(pad, H, D))
    ctx.attn_metadata = None
    out.fill_(float("nan"))
    layer._core(qkv, f, b, out)
    assert torch.equal(out, torch.zeros(T, H, D))
