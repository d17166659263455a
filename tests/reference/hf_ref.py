"""A second, independent reference: Hugging Face transformers' own KimiLinearForCausalLM.

This module owns running transformers' `models/kimi_linear` implementation (its modeling code,
its config parsing of the published config.json, and its checkpoint conversion: q/k/v conv
concatenation, w1/w3 expert merging, block_sparse_moe -> mlp renames) in plain PyTorch on a
local checkpoint written by `vllm_kimi_linear.tools.builder`. It shares no code with the plugin or with
tests/reference/kimi_linear_ref.py.

    model = load(model_dir)                    # float64, CPU, eval mode; no network
    lp = prompt_logprobs(model, ids)           # log p(ids[t] | ids[:t]), t >= 1, float64 CPU

Plain PyTorch, never fla: transformers picks fla's kernels (or causal_conv1d's) over its own
torch code when its decorator `use_kernel_func_from_hub_with_fallback` can import them, and it
decides once, when modeling_kimi_linear is executed. So this module executes a private copy of
that file (registered as `transformers.models.kimi_linear._hf_ref_*`) while `fla` and
`causal_conv1d` are hidden from the import system (their sys.modules entries, including ones
other tests already imported, are set to None and restored afterwards); `load` asserts that all
four wrapped functions bound the torch fallback, and `prompt_logprobs` asserts at run time that
the fallback KDA ran (it counts calls of the fallback's own l2norm). The real
modeling_kimi_linear module, and fla for everyone else, are left untouched.

Two documented departures from running transformers verbatim, both opt-out/opt-in:
- `widen_fp32=True` (default; only when dtype is float64): HF's code hard-codes float32 in its
  RMSNorms, the KDA gate and both KDA cores, the router and the eager softmax
  (`.to(torch.float32)`, `.float()`), so "float64" HF is really float32 there (~1e-6 error in
  logprobs). The private copy then has exactly those dtype tokens rewritten to float64
  (`torch.float32` -> `torch.float64`, `.float()` -> `.double()`); no operation is changed.
- `kv_a_layernorm_eps`: HF (like Moonshot's modeling_kimi.py) builds the MLA `kv_a_layernorm`
  with eps 1e-6, not config.rms_norm_eps (1e-5), which vLLM, the plugin and kimi_linear_ref use.
  None keeps HF's 1e-6; pass a float (e.g. the config's rms_norm_eps) to follow vLLM.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import sys
import types
from pathlib import Path

import torch

HIDDEN_PACKAGES = ("fla", "causal_conv1d")  # the packages HF would use instead of its torch code
FALLBACK_FUNCS = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention",
                  "causal_conv1d_fn", "causal_conv1d_update")
# Tensors the builder stores float32 in any checkpoint and the plugin keeps float32 in any model
# dtype (vllm_kimi_linear/layers/kda.py, moe.py): `weights_dtype` leaves them unrounded.
KEEP_FP32 = ("A_log", "dt_bias", "e_score_correction_bias")
HF_KV_A_LAYERNORM_EPS = 1e-6

_MODULES: dict[bool, types.ModuleType] = {}


# --------------------------------------------------------------------------------------------
# Hiding fla; the private copy of HF's modeling module
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hidden_packages(names=HIDDEN_PACKAGES):
    """While active, `import fla` (and fla.anything, causal_conv1d...) raises ModuleNotFoundError,
    also when fla was imported before; sys.modules is restored exactly afterwards."""
    def ours(key):
        return any(key == n or key.startswith(n + ".") for n in names)

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        sys.modules[k] = None
    for n in names:
        sys.modules[n] = None
    try:
        yield
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _widen(src: str) -> str:
    """HF's float32 casts -> float64 casts; nothing else in the source changes."""
    out, n32 = re.subn(r"\btorch\.float32\b", "torch.float64", src)
    out, nf = re.subn(r"\.float\(\)", ".double()", out)
    if n32 == 0 or nf == 0 or re.search(r"float32|\.float\(|\.half\(|bfloat16|float16", out):
        raise RuntimeError("transformers' modeling_kimi_linear changed its float32 casts; "
                           "review hf_ref._widen")
    return out


def modeling_module(widen_fp32: bool) -> types.ModuleType:
    """A private copy of transformers' modeling_kimi_linear, executed with fla hidden."""
    if widen_fp32 in _MODULES:
        return _MODULES[widen_fp32]
    pkg = importlib.import_module("transformers.models.kimi_linear")
    path = Path(pkg.__path__[0]) / "modeling_kimi_linear.py"
    src = path.read_text()
    if widen_fp32:
        src = _widen(src)
    name = f"{pkg.__name__}._hf_ref_{'fp64' if widen_fp32 else 'stock'}"
    mod = types.ModuleType(name)
    mod.__file__, mod.__package__ = str(path), pkg.__name__
    sys.modules[name] = mod
    try:
        with hidden_packages():
            exec(compile(src, str(path), "exec"), mod.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    check_fallback(mod)
    _MODULES[widen_fp32] = mod
    return mod


def _closure_vars(fn) -> dict:
    seen = 0
    while fn is not None and seen < 5:
        cv = inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}
        if "is_new_implementation" in cv:
            return cv
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    raise RuntimeError("cannot find use_kernel_func_from_hub_with_fallback's closure")


def check_fallback(mod: types.ModuleType) -> None:
    """Assert every fla/causal_conv1d-capable function of `mod` bound HF's torch code."""
    for f in FALLBACK_FUNCS:
        cv = _closure_vars(getattr(mod, f))
        assert not cv["is_new_implementation"] and cv["implementation"] is cv["torch_function"], (
            f"{f} is bound to {cv['implementation']!r}, not HF's plain-PyTorch fallback")
        assert cv["torch_function"].__module__ == mod.__name__, f


def _count_calls(mod: types.ModuleType, name: str) -> None:
    """Count calls of mod.<name> (the fallback KDA functions look it up as a module global)."""
    fn = getattr(mod, name)
    if getattr(fn, "_hf_ref_counted", False):
        return

    def counted(*a, **k):
        counted.calls += 1
        return fn(*a, **k)

    counted.calls, counted._hf_ref_counted = 0, True
    setattr(mod, name, counted)


# --------------------------------------------------------------------------------------------
# Config translation and loading
# --------------------------------------------------------------------------------------------


def published_layer_types(cfg: dict) -> tuple[list[str], list[str]]:
    """(layer_types, mlp_layer_types) that the published config.json means (kimi-linear.md):
    1-based kda_layers / full_attn_layers; layer i is MoE when i >= first_k_dense_replace and
    i % moe_layer_freq == 0."""
    L, lin = cfg["num_hidden_layers"], cfg["linear_attn_config"]
    kda, full = set(lin["kda_layers"]), set(lin["full_attn_layers"])
    if kda & full or kda | full != set(range(1, L + 1)):
        raise ValueError(f"kda_layers {sorted(kda)} and full_attn_layers {sorted(full)} must "
                         f"partition the 1-based layers 1..{L}")
    layer_types = ["linear_attention" if i + 1 in kda else "full_attention" for i in range(L)]
    k, freq = cfg["first_k_dense_replace"], cfg.get("moe_layer_freq", 1)
    mlp = ["sparse" if i >= k and i % freq == 0 else "dense" for i in range(L)]
    return layer_types, mlp


def hf_config(model_dir):
    """transformers' KimiLinearConfig of the checkpoint, checked against the published meaning.

    HF derives layer_types from linear_attn_config's 1-based lists and mlp_layer_types from
    first_k_dense_replace alone (it ignores moe_layer_freq); both are set here from the published
    semantics. Fields HF has no code for must hold the values HF hard-codes.
    """
    from transformers import KimiLinearConfig

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if raw.get("model_type") != "kimi_linear":
        raise ValueError(f"model_type {raw.get('model_type')!r}, expected 'kimi_linear'")
    if not raw.get("mla_use_nope", False):
        raise ValueError("HF's KimiLinearAttention applies no rotary embedding (NoPE only); "
                         "mla_use_nope must be true")
    if raw.get("moe_router_activation_func", "sigmoid") != "sigmoid":
        raise ValueError("HF's router is sigmoid only")
    if raw.get("tie_word_embeddings", False):
        raise ValueError("HF's KimiLinearForCausalLM never ties lm_head to the embedding")
    c = KimiLinearConfig.from_pretrained(str(model_dir), local_files_only=True)
    c.layer_types, c.mlp_layer_types = published_layer_types(raw)
    if not raw.get("use_grouped_topk", True):
        c.n_group = c.topk_group = 1  # HF always runs grouped top-k; one group = plain top-k
    # MLA expands the latent into k and v for every head: no GQA (HF's default kv heads is 32)
    c.num_key_value_heads = c.num_attention_heads
    lin = raw["linear_attn_config"]
    want = {  # HF attribute (aliases go through its attribute_map) -> the published field
        "num_local_experts": raw["num_experts"],
        "num_experts_per_tok": raw["num_experts_per_token"],
        "n_shared_experts": raw["num_shared_experts"], "norm_topk_prob": raw["moe_renormalize"],
        "routed_scaling_factor": raw["routed_scaling_factor"],
        "linear_num_heads": lin["num_heads"], "linear_head_dim": lin["head_dim"],
        "linear_conv_kernel_dim": lin["short_conv_kernel_size"],
        "rms_norm_eps": raw["rms_norm_eps"], "hidden_act": "silu",
        "q_lora_rank": raw["q_lora_rank"], "kv_lora_rank": raw["kv_lora_rank"],
        "qk_nope_head_dim": raw["qk_nope_head_dim"], "qk_rope_head_dim": raw["qk_rope_head_dim"],
        "v_head_dim": raw["v_head_dim"], "moe_intermediate_size": raw["moe_intermediate_size"],
    }
    got = {k: getattr(c, k) for k in want}
    if got != want:
        diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
        raise ValueError(f"KimiLinearConfig reads config.json differently (HF, published): {diff}")
    return c


def load(model_dir, dtype: torch.dtype = torch.float64, device="cpu",
         weights_dtype: torch.dtype | None = None, *, widen_fp32: bool = True,
         kv_a_layernorm_eps: float | None = None, keep_fp32=KEEP_FP32):
    """HF's KimiLinearForCausalLM (eval mode, eager attention and experts) from local files.

    weights_dtype: round every weight to it, then cast to `dtype` (e.g. bfloat16: a float64
    model of what a bf16 server holds); names containing a `keep_fp32` entry are not rounded
    (pass keep_fp32=() to round those too). widen_fp32 / kv_a_layernorm_eps: module docstring.
    """
    widen = bool(widen_fp32) and dtype == torch.float64
    mod = modeling_module(widen)
    _count_calls(mod, "l2norm")
    config = hf_config(model_dir)
    with hidden_packages():
        model, info = mod.KimiLinearForCausalLM.from_pretrained(
            str(model_dir), config=config, dtype=dtype, local_files_only=True,
            attn_implementation="eager", experts_implementation="eager",
            output_loading_info=True)
    # num_shared_experts = 0: HF still builds a shared expert, of width 0, whose empty weights
    # are "missing"; it adds exactly zero, so only those may be missing.
    empty = {n for n, t in model.state_dict().items() if t.numel() == 0}
    bad = {k: v for k, v in info.items() if v and (k != "missing_keys" or set(v) - empty)}
    if bad:
        raise ValueError(f"HF's loader did not map the checkpoint one-to-one: {bad}")
    model.eval().to(device)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            if t.dtype != dtype:
                raise ValueError(f"{name} is {t.dtype}, expected {dtype}")
            if weights_dtype is not None and not any(k in name for k in keep_fp32):
                t.copy_(t.to(weights_dtype).to(dtype))
    n_mla = 0
    for m in model.modules():
        if isinstance(m, mod.KimiLinearAttention):
            n_mla += 1
            assert m.kv_a_layernorm.variance_epsilon == HF_KV_A_LAYERNORM_EPS, (
                "HF's kv_a_layernorm eps is no longer 1e-6: review hf_ref's docstring")
            if kv_a_layernorm_eps is not None:
                m.kv_a_layernorm.variance_epsilon = float(kv_a_layernorm_eps)
    assert n_mla == config.layer_types.count("full_attention")
    model.hf_ref = types.SimpleNamespace(module=mod, widen_fp32=widen,
                                         n_kda=config.layer_types.count("linear_attention"))
    return model


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    """[T, vocab] logits of one full-sequence forward from empty state (no cache)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    dev = next(model.parameters()).device
    counter = getattr(model.hf_ref.module, "l2norm")
    before = counter.calls
    with hidden_packages():
        out = model(input_ids=ids[None].to(dev), use_cache=False).logits[0]
    # the fallback KDA (chunk or recurrent) L2-normalises q and k once per KDA layer
    assert counter.calls - before == 2 * model.hf_ref.n_kda, "HF's torch KDA fallback did not run"
    return out


def prompt_logprobs(model, ids) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1, shape [T-1], float64 on CPU."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    lp = torch.log_softmax(logits(model, ids).to("cpu", torch.float64), dim=-1)
    return lp[:-1].gather(-1, ids[1:, None])[:, 0]
