"""Two independent references agree: transformers' KimiLinearForCausalLM (tests/reference/hf_ref.py,
plain PyTorch, fla hidden) and our kimi_linear_ref (written from kimi-linear.md), in float64.

Layouts: the builder's tiny model (session fixture), "mla-first" (MLA at 1-based layer 1, two
dense layers, odd head/expert counts) and a narrow one with no shared expert and conv kernel 3.

Tolerances (max |difference| of prompt logprobs, which are O(10) here; lengths 5, 70, 200):
- TOL_FP64 = 1e-10 when kimi_linear_ref's KDA gate is evaluated in float64 (test-local: fla's
  naive_kda_gate always computes in float32). Then both sides are float64 throughout and differ
  only by summation order (HF's chunk-64 WY form vs the per-token recurrence, grouped vs dense
  experts, matmul vs einsum attention): float64 rounding, ~1e-16 relative, through a few layers;
  observed <= 5e-14.
- TOL_REF = 2e-6 against kimi_linear_ref as it is: its fp32 gate (relative error ~6e-8 in every
  log-decay) alone moves logprobs by up to ~6e-7 at 200 tokens. Still well below what HF's own
  kv_a_layernorm eps (1e-6 instead of 1e-5) does (1e-5..8e-5), see test_hf_kv_a_layernorm_eps.
- TOL_STOCK = 1e-4 for HF's unmodified code, which computes norms, gate, KDA, router and softmax
  in float32 (hf_ref.load(widen_fp32=False)): observed <= 1.6e-5.
Every comparison here passes kv_a_layernorm_eps = rms_norm_eps (what vLLM and the plugin use)
except test_hf_kv_a_layernorm_eps.
"""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.engine_util import prompt
from tests.reference import hf_ref
from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.tools.builder import LAYOUTS, build_tiny_checkpoint

LENGTHS = (5, 70, 200)
TOL_FP64, TOL_REF, TOL_STOCK = 1e-10, 2e-6, 1e-4
NARROW = dict(hidden=64, layers=5, kda_heads=2, kda_head_dim=32, conv_kernel=3, mla_heads=2,
              kv_lora_rank=32, qk_nope=16, qk_rope=16, v_head=24, experts=4, topk=3,
              shared_experts=0, moe_inter=32, inter=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waits when other test
    processes load the cores (two threads then made this module several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def layouts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_ref")
    return {"tiny": tiny_model_dir,
            "mla-first": build_tiny_checkpoint(d / "mla-first", **LAYOUTS["mla-first"]),
            "narrow": build_tiny_checkpoint(d / "narrow", **NARROW)}


@pytest.fixture(scope="module")
def models(layouts):
    """name -> (kimi_linear_ref float64, HF float64 with kv_a_layernorm eps = rms_norm_eps)."""
    out = {}
    for name, d in layouts.items():
        r = ref.load(d, dtype=torch.float64)
        out[name] = (r, hf_ref.load(d, kv_a_layernorm_eps=r.config["rms_norm_eps"]))
    return out


@pytest.fixture
def ref_gate_fp64(monkeypatch):
    """kimi_linear_ref with fla's naive_kda_gate formula evaluated in float64 (this test only)."""
    kda_ops = ref._kda_ops
    assert kda_ops(torch.float64)[0].__name__ == "naive_kda_gate"

    def gate64(g, A_log, dt_bias=None, output_dtype=torch.float32):
        H = g.shape[-2]
        g = g if dt_bias is None else g + dt_bias.view(H, -1)
        return (-A_log.view(H, 1).exp() * F.softplus(g)).to(output_dtype)

    monkeypatch.setattr(ref, "_kda_ops", lambda dtype: (gate64, kda_ops(dtype)[1]))


def max_diff(r, m, salt: int = 3) -> dict[int, float]:
    out = {}
    for n in LENGTHS:
        ids = prompt(n, salt)
        a, b = ref.prompt_logprobs(r, ids), hf_ref.prompt_logprobs(m, ids)
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape == (n - 1,)
        out[n] = (a - b).abs().max().item()
    return out


def test_fla_hidden_during_load_and_restored(layouts, monkeypatch):
    fla = pytest.importorskip("fla")
    importlib.import_module("fla.ops.kda")  # as other tests leave it: imported
    monkeypatch.setattr(hf_ref, "_MODULES", {})  # execute HF's modeling code afresh, fla imported
    before = {k: v for k, v in sys.modules.items() if k == "fla" or k.startswith("fla.")}
    with hf_ref.hidden_packages():
        for name in ("fla", "fla.ops.kda", "causal_conv1d"):
            with pytest.raises(ModuleNotFoundError):
                importlib.import_module(name)
    m = hf_ref.load(layouts["tiny"])
    hf_ref.prompt_logprobs(m, prompt(70, 1))  # asserts the fallback KDA ran
    after = {k: v for k, v in sys.modules.items() if k == "fla" or k.startswith("fla.")}
    assert after == before and sys.modules["fla"] is fla
    hf_ref.check_fallback(m.hf_ref.module)  # all four wrapped functions bound HF's torch code
    real = sys.modules.get("transformers.models.kimi_linear.modeling_kimi_linear")
    assert m.hf_ref.module is not real  # the real module (and its fla binding) is untouched


@pytest.mark.parametrize("layout", ["tiny", "mla-first", "narrow"])
def test_matches_reference_float64(models, layout, ref_gate_fp64):
    r, m = models[layout]
    d = max_diff(r, m)
    assert max(d.values()) < TOL_FP64, d


@pytest.mark.parametrize("layout", ["tiny", "mla-first", "narrow"])
def test_matches_reference_as_is(models, layout):
    r, m = models[layout]
    d = max_diff(r, m, salt=5)
    assert max(d.values()) < TOL_REF, d


def test_stock_hf_precision(models, layouts):
    r, _ = models["tiny"]
    m = hf_ref.load(layouts["tiny"], widen_fp32=False, kv_a_layernorm_eps=r.config["rms_norm_eps"])
    assert not m.hf_ref.widen_fp32
    assert max(max_diff(r, m).values()) < TOL_STOCK


def test_hf_kv_a_layernorm_eps(models, layouts, ref_gate_fp64):
    """HF builds kv_a_layernorm with eps 1e-6 (as modeling_kimi.py); vLLM, the plugin and our
    reference use rms_norm_eps = 1e-5. A real, small difference, far above float64 noise."""
    r, _ = models["tiny"]
    m = hf_ref.load(layouts["tiny"])
    d = max(max_diff(r, m).values())
    assert 1e-7 < d < 1e-3, d


def test_weights_dtype_rounds_like_a_bf16_checkpoint(models, layouts, tmp_path, ref_gate_fp64):
    """load(f32 dir, weights_dtype=bf16) holds exactly what a bfloat16 build holds (A_log,
    dt_bias and e_score_correction_bias stay float32 in both), in float64."""
    r32, _ = models["tiny"]
    eps = r32.config["rms_norm_eps"]
    bf16_dir = build_tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16")
    rounded = hf_ref.load(layouts["tiny"], weights_dtype=torch.bfloat16, kv_a_layernorm_eps=eps)
    built = hf_ref.load(bf16_dir, kv_a_layernorm_eps=eps)
    a, b = rounded.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float64 for t in a.values())
    f32 = models["tiny"][1].state_dict()
    assert not torch.equal(a["lm_head.weight"], f32["lm_head.weight"])
    for k in ("model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.0.self_attn.forget_gate.A_log",
              "model.layers.0.self_attn.forget_gate.dt_bias"):
        assert torch.equal(a[k], f32[k]) and not torch.equal(a[k], f32[k].bfloat16().double()), k
    d = max(max_diff(ref.load(bf16_dir, dtype=torch.float64), rounded).values())
    assert d < TOL_FP64, d
