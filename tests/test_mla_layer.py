"""Which MLA layer the model builds (layers/mla.py), and vLLM's fused Kimi MLA layer, the one it
builds on CUDA, against the float64 reference on the tiny checkpoint.

The fused layer's kernels are Triton (CUDA only: tests/gpu runs them); here it is built on CPU
and everything around them is checked: its parameters are the checkpoint's tensors under the
checkpoint's names, and its decode arithmetic (the query absorbed through W_UK_T, attention
over the normalised latent and the unrotated rope part, W_UV, o_proj, its softmax scale), run
in torch from the layer's own modules and absorbed weights, equals the reference's MLA."""
from __future__ import annotations

import json

import pytest
import torch

from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.config import KimiLinearDims
from vllm_kimi_linear.layers import mla as mla_module
from vllm_kimi_linear.tools.builder import build_tiny_checkpoint


@pytest.fixture(scope="module")
def vllm_context(tmp_path_factory):
    """vLLM's config and a one-rank process group, as a worker has them when it builds layers."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  ensure_model_parallel_initialized, init_distributed_environment)
    config = VllmConfig()
    rendezvous = tmp_path_factory.mktemp("dist") / "init"
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{rendezvous}")
        ensure_model_parallel_initialized(1, 1)
        try:
            yield config
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = build_tiny_checkpoint(tmp_path_factory.mktemp("mla") / "tiny", seed=11)
    cfg = json.loads((d / "config.json").read_text())
    return KimiLinearDims.from_config(cfg), ref.load(d, torch.float64)


def _build(vllm_context, dims, monkeypatch, fused: bool, prefix: str):
    monkeypatch.setattr(mla_module, "uses_fused_mla", lambda _cfg: fused)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return mla_module.mla_layer(vllm_context, dims, prefix)
    finally:
        torch.set_default_dtype(default)


def test_fused_on_cuda_with_an_unquantized_cache_only(monkeypatch):
    from types import SimpleNamespace
    cfg = lambda dtype: SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=dtype))  # noqa: E731
    assert not mla_module.uses_fused_mla(cfg("auto"))  # this machine: CPU
    monkeypatch.setattr(mla_module.current_platform, "is_cuda", lambda: True)
    assert mla_module.uses_fused_mla(cfg("auto")) and mla_module.uses_fused_mla(cfg("bfloat16"))
    assert not mla_module.uses_fused_mla(cfg("fp8")) and not mla_module.uses_fused_mla(cfg("fp8_e4m3"))


def test_both_layers_hold_the_checkpoint_tensors(vllm_context, checkpoint, monkeypatch):
    dims, m = checkpoint
    (i,) = m.mla
    prefix = f"model.layers.{i}.self_attn"
    fused = _build(vllm_context, dims, monkeypatch, True, prefix + "_fused")
    generic = _build(vllm_context, dims, monkeypatch, False, prefix + "_generic")
    from vllm.models.kimi_k3.nvidia.mla import MultiHeadLatentAttention
    assert isinstance(fused, MultiHeadLatentAttention)
    assert isinstance(generic, mla_module.KimiMLAAttention)
    want = {k[len(prefix) + 1:]: tuple(v.shape) for k, v in m.w.items() if k.startswith(prefix + ".")}
    for layer in (fused, generic):
        assert {k: tuple(p.shape) for k, p in layer.named_parameters()} == want


def test_fused_layer_decode_arithmetic_equals_the_reference(vllm_context, checkpoint, monkeypatch):
    dims, m = checkpoint
    (i,) = m.mla
    prefix = f"model.layers.{i}.self_attn"
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    layer = _build(vllm_context, dims, monkeypatch, True, prefix + "_decode")
    for name, p in layer.named_parameters():
        w = m.w[f"{prefix}.{name}"].float()
        getattr(p, "weight_loader", default_weight_loader)(p, w)  # as the model's load_weights does
    # (the linears' CPU repacking is left out: it would drop the weights this test reads)
    layer.process_weights_after_loading(torch.float32)
    lin = lambda mod, x: torch.nn.functional.linear(x, mod.weight)  # noqa: E731

    T, n, nope, rope, L = 9, layer.num_local_heads, layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.kv_lora_rank
    x = torch.randn(T, dims.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = ref.mla_attention(m, i, x)  # causal: row t attends to tokens 0..t

    with torch.no_grad():
        xf = x.float()
        q = lin(layer.q_proj, xf).view(T, n, nope + rope)
        latent, k_pe = lin(layer.kv_a_proj_with_mqa, xf).split([L, rope], dim=-1)
        latent = layer.kv_a_layernorm(latent)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        ql = torch.bmm(q_nope.transpose(0, 1), layer.W_UK_T).transpose(0, 1)  # [T, n, L]
        scores = (torch.einsum("tnl,sl->nts", ql, latent)
                  + torch.einsum("tnr,sr->nts", q_pe, k_pe)) * layer.scale
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        latent_out = torch.einsum("nts,sl->tnl", p, latent).contiguous()
        attn = torch.empty(T, n * layer.v_head_dim)
        layer._v_up_proj(latent_out, out=attn)
        got = lin(layer.o_proj, attn)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert layer.scale == (nope + rope) ** -0.5
