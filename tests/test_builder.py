"""The tiny-checkpoint builder (vllm_kimi_linear/tools/builder.py) and the plain-PyTorch reference.

Builder: determinism, the published tensor names/shapes/dtypes, config fields and 1-based layer
lists, the all-MLA variant, the "mla-first" layout (MLA at layer 0, several dense layers, odd
head/expert counts), and the local tokenizer (offline). Reference: runs on the tiny model,
finite logits, non-degenerate greedy output, causality. Expected names and shapes are derived
here from config.json, independently of both the builder and the reference.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.tools.builder import (LAYOUTS, TinyOptions, _parse, build_tiny_checkpoint,
                                      layer_lists)
from vllm_kimi_linear.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"]
# Small dims for the variant builds, so they cost little.
SMALL = dict(hidden=64, kda_heads=2, kda_head_dim=32, mla_heads=2, kv_lora_rank=32, qk_nope=16,
             qk_rope=16, v_head=16, experts=4, moe_inter=32, inter=128, vocab=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny):
    return ref.load(tiny)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def read_tensors(d: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


# ------------------------------------------------------------------------------------ builder


def test_cli_build_is_byte_identical(tiny, tmp_path):
    # Another process (fresh Rust hash seeds for the BPE trainer), through the CLI.
    out = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "vllm_kimi_linear.tools.builder", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4 layers" in r.stdout
    for name in FILES:
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name


def test_seed_changes_weights_not_layout(tiny, tmp_path):
    other = build_tiny_checkpoint(tmp_path, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert read_tensors(other) == read_tensors(tiny)
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_tensor_names_shapes_dtypes(tiny):
    c = read_config(tiny)
    got = read_tensors(tiny)
    want = ref.expected_shapes(c)
    assert sorted(got) == sorted(want)
    assert {k: s for k, (s, _) in got.items()} == want
    for k, (_, dt) in got.items():
        assert dt == torch.float32, k


def test_config_fields(tiny, tokenizer):
    c = read_config(tiny)
    assert c["architectures"] == ["KimiLinearForCausalLM"] and c["model_type"] == "kimi_linear"
    assert c["linear_attn_config"] == {"num_heads": 4, "head_dim": 64, "short_conv_kernel_size": 4,
                                       "kda_layers": [1, 2, 3], "full_attn_layers": [4]}
    assert (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]) == (256, 4, 512)
    assert c["num_attention_heads"] == c["num_key_value_heads"] == 4
    assert (c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
            c["v_head_dim"], c["mla_use_nope"]) == (None, 512, 64, 64, 64, True)
    assert (c["num_experts"], c["num_experts_per_token"], c["num_shared_experts"],
            c["moe_intermediate_size"]) == (8, 2, 1, 128)
    assert (c["first_k_dense_replace"], c["moe_layer_freq"], c["moe_router_activation_func"],
            c["moe_renormalize"], c["routed_scaling_factor"]) == (1, 1, "sigmoid", True, 2.446)
    assert (c["use_grouped_topk"], c["num_expert_group"], c["topk_group"]) == (True, 1, 1)
    assert (c["rms_norm_eps"], c["tie_word_embeddings"], c["hidden_act"]) == (1e-5, False, "silu")
    assert c["model_max_length"] == c["max_position_embeddings"] == 131072
    assert c["torch_dtype"] == "float32" and "head_dim" in c
    assert c["vocab_size"] == len(tokenizer)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        c["bos_token_id"], c["eos_token_id"], c["pad_token_id"])


@pytest.mark.parametrize("layers,all_mla,kda,full", [
    (4, False, [1, 2, 3], [4]),
    (8, False, [1, 2, 3, 5, 6, 7], [4, 8]),
    (3, False, [1, 2, 3], []),
    (3, True, [], [1, 2, 3]),
])
def test_layer_lists_are_one_based(layers, all_mla, kda, full):
    assert layer_lists(layers, all_mla) == (kda, full)


@pytest.mark.parametrize("layers,given,kda,full", [
    (6, (1, 5), [2, 3, 4, 6], [1, 5]),
    (4, (4,), [1, 2, 3], [4]),
    (3, (), [1, 2, 3], []),
    (2, (2, 1), [], [1, 2]),
])
def test_layer_lists_given_mla_layers(layers, given, kda, full):
    assert layer_lists(layers, full_attn_layers=given) == (kda, full)


# sha256 of the default config.json (pure Python, so stable across library versions): the default
# layout must not change when layout options are added. The weights are compared below through a
# build that names the default layout explicitly.
DEFAULT_CONFIG_SHA256 = "65e7c4335a2a2eb7a6d18c15f20f0467d057fe2674c41135c9e40f44ddfb3a98"


def test_default_layout_is_unchanged(tiny, tmp_path):
    assert hashlib.sha256((tiny / "config.json").read_bytes()).hexdigest() == DEFAULT_CONFIG_SHA256
    explicit = build_tiny_checkpoint(tmp_path, full_attn_layers=(4,), dense_layers=1,
                                     **LAYOUTS["tiny"])
    for name in FILES:
        assert (explicit / name).read_bytes() == (tiny / name).read_bytes(), name


# ------------------------------------------------------------------------- mla-first layout

MLA_FIRST = dict(layers=6, full_attn_layers=(1, 5), dense_layers=2, kda_heads=3, mla_heads=5,
                 experts=7, topk=3)


@pytest.fixture(scope="module")
def mla_first(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("mla-first"), **LAYOUTS["mla-first"])


def test_mla_first_preset():
    assert LAYOUTS["mla-first"] == MLA_FIRST
    assert TinyOptions(**LAYOUTS["tiny"]) == TinyOptions()


def test_mla_first_config_and_tensors(mla_first):
    c = read_config(mla_first)
    lin = c["linear_attn_config"]
    assert (lin["kda_layers"], lin["full_attn_layers"]) == ([2, 3, 4, 6], [1, 5])
    assert (c["num_hidden_layers"], c["first_k_dense_replace"], c["moe_layer_freq"]) == (6, 2, 1)
    assert (lin["num_heads"], c["num_attention_heads"], c["num_key_value_heads"]) == (3, 5, 5)
    assert (c["num_experts"], c["num_experts_per_token"]) == (7, 3)
    assert (c["kv_lora_rank"], c["qk_rope_head_dim"]) == (512, 64)  # vLLM's CPU MLA head size
    dims = validate_config(c, tp_size=1, on_cpu=True)
    got = {k: s for k, (s, _) in read_tensors(mla_first).items()}
    assert got == dims.checkpoint_shapes()
    assert got == ref.expected_shapes(c)
    # MLA at layer 0 (0-based), the dense MLP in layers 0 and 1, the MoE from layer 2
    assert got["model.layers.0.self_attn.q_proj.weight"] == (5 * 128, 256)
    assert "model.layers.0.self_attn.A_log" not in got
    assert got["model.layers.1.self_attn.A_log"] == (1, 1, 3, 1)
    assert "model.layers.1.mlp.gate_proj.weight" in got
    assert not any(k.startswith(f"model.layers.{i}.block_sparse_moe") for k in got for i in (0, 1))
    assert got["model.layers.2.block_sparse_moe.gate.weight"] == (7, 256)
    assert "model.layers.2.block_sparse_moe.experts.6.w2.weight" in got


def test_mla_first_config_loads_in_vllms_config_class(mla_first):
    # 256 // 5 = 51 would fail the config class's rotary check ("RoPE requires an even rotary
    # dimension"): the builder writes an even head_dim (unused by the model).
    configs = pytest.importorskip("vllm.transformers_utils.configs.kimi_linear")
    c = read_config(mla_first)
    assert c["head_dim"] == 50
    hf = configs.KimiLinearConfig(**c)
    assert [hf.is_kda_layer(i) for i in range(6)] == [False, True, True, True, False, True]
    assert hf.first_k_dense_replace == 2


def test_mla_first_reference_forward(mla_first):
    m = ref.load(mla_first)
    assert (sorted(m.mla), sorted(m.kda)) == ([0, 4], [1, 2, 3, 5])
    assert [m.is_moe(i) for i in range(6)] == [False, False, True, True, True, True]
    ids = [(37 * j + 7) % 1000 for j in range(20)]
    logits = ref.forward(m, ids)
    assert logits.shape == (20, m.config["vocab_size"]) and torch.isfinite(logits).all()
    lp = ref.prompt_logprobs(m, ids)
    assert lp.shape == (19,) and torch.isfinite(lp).all() and (lp <= 0).all()


def test_cli_layout_preset(mla_first, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vllm_kimi_linear.tools.builder", str(out), "--layout",
                        "mla-first"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 layers (KDA [2, 3, 4, 6], MLA [1, 5], 1-based; 2 dense)" in r.stdout
    for name in FILES:
        assert (out / name).read_bytes() == (mla_first / name).read_bytes(), name


def test_cli_layout_options_parse(tmp_path, capsys):
    _, o = _parse([str(tmp_path), "--layers", "6", "--full-attn-layers", "1,5",
                   "--dense-layers", "2"])
    assert (o["layers"], o["full_attn_layers"], o["dense_layers"]) == (6, (1, 5), 2)
    _, o = _parse([str(tmp_path)])
    assert TinyOptions(**o) == TinyOptions()
    # a preset's values are defaults: explicit options override them
    _, o = _parse([str(tmp_path), "--layout", "mla-first", "--dense-layers", "3"])
    assert TinyOptions(**o) == TinyOptions(**(MLA_FIRST | {"dense_layers": 3}))
    with pytest.raises(SystemExit):
        _parse([str(tmp_path), "--full-attn-layers", "1,x"])
    assert "comma list of 1-based layer numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([str(tmp_path), "--layout", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("opts,match", [
    (dict(full_attn_layers=(0, 4)),
     r"full_attn_layers \[0, 4\]: \[0\] out of range; layer numbers are 1-based, 1..layers=4"),
    (dict(full_attn_layers=(5,)), r"\[5\] out of range"),
    (dict(full_attn_layers=(4, 4)), r"full_attn_layers \[4, 4\] lists a layer twice"),
    (dict(full_attn_layers=(4,), all_mla=True), r"all_mla and full_attn_layers both choose"),
    (dict(full_attn_layers="1,5"), r"full_attn_layers must be a sequence of 1-based layer numbers"),
    (dict(dense_layers=-1), r"dense_layers must be in 0..layers=4, got -1"),
    (dict(dense_layers=5), r"dense_layers must be in 0..layers=4, got 5"),
    (dict(MLA_FIRST, layers=4), r"\[5\] out of range"),
])
def test_bad_layout_options_are_clear(tmp_path, opts, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_checkpoint(tmp_path, **opts)
    assert not any(tmp_path.iterdir())  # rejected before anything is written


def test_layout_edge_values_are_accepted():
    assert TinyOptions(dense_layers=0).dense_layers == 0
    assert TinyOptions(dense_layers=4).dense_layers == 4
    assert TinyOptions(full_attn_layers=()).full_attn_layers == ()
    assert TinyOptions(full_attn_layers=[5, 1], layers=6).full_attn_layers == (1, 5)


def test_all_mla_bf16_variant(tmp_path):
    d = build_tiny_checkpoint(tmp_path / "bf16", all_mla=True, layers=3, dtype="bfloat16", **SMALL)
    c = read_config(d)
    assert c["linear_attn_config"]["kda_layers"] == []
    assert c["linear_attn_config"]["full_attn_layers"] == [1, 2, 3]
    assert c["torch_dtype"] == "bfloat16" and c["vocab_size"] == 600
    got = read_tensors(d)
    assert {k: s for k, (s, _) in got.items()} == ref.expected_shapes(c)
    assert not any("conv1d" in k or "A_log" in k for k in got)
    fp32_kept = {k for k, (_, dt) in got.items() if dt == torch.float32}
    assert all(dt in (torch.bfloat16, torch.float32) for _, dt in got.values())
    assert fp32_kept == {k for k in got if k.endswith("e_score_correction_bias")}
    # a bfloat16 build is the float32 build rounded
    f = build_tiny_checkpoint(tmp_path / "fp32", all_mla=True, layers=3, **SMALL)
    k = "model.layers.1.self_attn.kv_b_proj.weight"
    with safe_open(str(d / "model.safetensors"), "pt") as a:
        with safe_open(str(f / "model.safetensors"), "pt") as b:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k).bfloat16())
    m = ref.load(d)
    logits = ref.forward(m, [5, 17, 300, 42, 7])
    assert logits.shape == (5, 600) and torch.isfinite(logits).all()


def test_kda_params_stay_fp32_in_bf16(tmp_path):
    d = build_tiny_checkpoint(tmp_path, layers=2, dtype="bfloat16", **SMALL)
    dts = {k: dt for k, (_, dt) in read_tensors(d).items()}
    assert dts["model.layers.0.self_attn.A_log"] == torch.float32
    assert dts["model.layers.0.self_attn.dt_bias"] == torch.float32
    assert dts["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16


def test_bad_options_are_clear(tmp_path):
    with pytest.raises(TypeError, match="unknown option"):
        build_tiny_checkpoint(tmp_path, hiden=8)
    with pytest.raises(ValueError, match="vocab must be in"):
        build_tiny_checkpoint(tmp_path, vocab=100000)
    with pytest.raises(ValueError, match="topk"):
        build_tiny_checkpoint(tmp_path, topk=9)


def test_tokenizer_offline(tiny, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "The clockmaker repaired 12 watches, ünïcødé 你好!\n  def f(x): return x"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 1000 <= len(tokenizer) <= 2000
    for t in ("<|im_start|>", "<|im_end|>", "[BOS]", "[EOS]", "[PAD]"):
        assert len(tokenizer(t)["input_ids"]) == 1, t
    assert tokenizer.eos_token == "<|im_end|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert chat_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


# ---------------------------------------------------------------------------------- reference


def test_reference_runs_and_is_not_degenerate(model, tokenizer):
    prompts = ["Once upon a time, in a small village", "Question: What is the capital of France?"]
    outs = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_dict=False)
        logits = ref.forward(model, ids)
        assert logits.shape == (len(ids), model.config["vocab_size"]) and torch.isfinite(logits).all()
        out = ref.greedy_generate(model, ids, 12)
        assert len(out) == 12 and len(set(out)) > 3, out
        outs.append(out)
        lp = ref.prompt_logprobs(model, ids)
        assert lp.shape == (len(ids) - 1,) and (lp <= 0).all()
    assert outs[0] != outs[1]


def test_router_bias_is_exercised(model):
    # The correction bias must change some selections, else a loader that drops it would pass.
    x = torch.randn(64, model.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    x = ref.rms_norm(x, model.w["model.layers.1.post_attention_layernorm.weight"], model.eps)
    p = "model.layers.1.block_sparse_moe.gate."
    scores = torch.sigmoid(x @ model.w[p + "weight"].T)
    k = model.config["num_experts_per_token"]
    by_score = scores.topk(k).indices.sort().values
    by_biased = (scores + model.w[p + "e_score_correction_bias"]).topk(k).indices.sort().values
    assert (by_score != by_biased).any()
    assert by_biased.unique().numel() == model.config["num_experts"]


def test_reference_kda_layer_is_causal(model):
    hid = model.config["hidden_size"]
    x = torch.randn(20, hid, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[12:] += torch.randn(8, hid, generator=torch.Generator().manual_seed(2))
    assert 0 in model.kda
    a, b = ref.kda_attention(model, 0, x), ref.kda_attention(model, 0, y)
    torch.testing.assert_close(a[:12], b[:12], rtol=0, atol=1e-6)
    assert (a[12:] - b[12:]).abs().max() > 1e-2
    # and the whole model (KDA + MLA + MoE): a later token never moves earlier logits
    ids = [100, 200, 300, 400, 500, 600, 700]
    l1, l2 = ref.forward(model, ids), ref.forward(model, ids[:-1] + [5])
    torch.testing.assert_close(l1[:-1], l2[:-1], rtol=0, atol=1e-5)
    assert (l1[-1] - l2[-1]).abs().max() > 1e-2


def test_reference_kda_state_carries_far(model):
    # With the slow decay the builder draws, a KDA layer's output 30 tokens later still depends
    # on a token: the property that makes recurrent-state bugs visible against this reference.
    hid = model.config["hidden_size"]
    x = torch.randn(32, hid, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0] = torch.randn(hid, generator=torch.Generator().manual_seed(4))
    a, b = ref.kda_attention(model, 0, x), ref.kda_attention(model, 0, y)
    assert (a[-1] - b[-1]).abs().max() > 1e-3 * a[-1].abs().max()


def test_reference_kda_core_is_the_spec_matrix_form(model, monkeypatch):
    # Swap fla's recurrence for kimi-linear.md step 5 written literally in float64:
    # S_t = (I - b k k^T) Diag(exp g) S_{t-1} + b k v^T,  o_t = S_t^T (D^-0.5 q).
    def literal(q, k, v, g, beta, scale):
        q, k, v, g, beta = (t[0].double() for t in (q, k, v, g, beta))
        T, H, D = q.shape
        eye = torch.eye(D, dtype=torch.float64)
        o = torch.empty(T, H, v.shape[-1], dtype=torch.float64)
        for h in range(H):
            S = torch.zeros(D, v.shape[-1], dtype=torch.float64)
            for t in range(T):
                kt, b = k[t, h][:, None], beta[t, h]
                S = (eye - b * kt @ kt.T) @ torch.diag(g[t, h].exp()) @ S + b * kt @ v[t, h][None]
                o[t, h] = S.T @ (scale * q[t, h])
        return o[None].float(), None

    x = torch.randn(16, model.config["hidden_size"], generator=torch.Generator().manual_seed(5))
    expected = ref.kda_attention(model, 1, x)
    gate_fn, _ = ref._kda_ops(torch.float32)
    monkeypatch.setattr(ref, "_kda_ops", lambda dtype: (gate_fn, literal))
    torch.testing.assert_close(ref.kda_attention(model, 1, x), expected, rtol=1e-4, atol=1e-5)


def test_published_config_has_the_published_dimensions_and_no_weights(tmp_path):
    """`--published-config`: Kimi-Linear-48B-A3B's dimensions for `--load-format dummy` runs."""
    from vllm_kimi_linear.tools.planner import published_config
    r = subprocess.run([sys.executable, "-m", "vllm_kimi_linear.tools.builder", str(tmp_path / "p"),
                        "--published-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    c = read_config(tmp_path / "p")
    assert {k: c[k] for k in published_config()} == published_config()
    dims = validate_config(c, tp_size=8)
    assert (dims.num_layers, dims.moe.num_experts, dims.kda.num_heads) == (27, 256, 32)
    assert not list((tmp_path / "p").glob("*.safetensors"))
    assert (tmp_path / "p" / "tokenizer.json").is_file()
