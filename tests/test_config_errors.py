"""A config.json or checkpoint the plugin cannot serve fails with ONE clear ValueError that names
the field or tensor (vllm_kimi_linear/config.py), both when the checks are called directly and
when vLLM starts an engine on the bad model directory (the config hook; the weight loader)."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_kimi_linear.tools.harness import server_env
from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
from vllm_kimi_linear.checkpoint import KimiLinearCheckpointError, check_all_present, check_tensor
from vllm_kimi_linear.config import KimiLinearConfigError, KimiLinearDims, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cfg") / "tiny")


@pytest.fixture(scope="module")
def cfg(tiny) -> dict:
    return json.loads((tiny / "config.json").read_text())


def _with(cfg: dict, edit) -> dict:
    c = copy.deepcopy(cfg)
    edit(c)
    return c


def test_builder_config_is_valid(cfg):
    validate_config(cfg, tp_size=1, on_cpu=True)
    validate_config(cfg, tp_size=2, on_cpu=True)


CASES = {
    "both_lists": (lambda c: c["linear_attn_config"].__setitem__("kda_layers", [1, 2, 3, 4]),
                   r"\[4\] \(1-based\) are in both linear_attn_config.kda_layers and full_attn_layers"),
    "neither_list": (lambda c: c["linear_attn_config"].__setitem__("kda_layers", [1, 2]),
                     r"\[3\] \(1-based\) are in neither linear_attn_config.kda_layers"),
    "zero_based": (lambda c: c["linear_attn_config"].__setitem__("kda_layers", [0, 1, 2]),
                   r"kda_layers has \[0\] out of range: layer numbers are 1-based"),
    "past_end": (lambda c: c["linear_attn_config"].__setitem__("full_attn_layers", [4, 5]),
                 r"full_attn_layers has \[5\] out of range"),
    "missing_field": (lambda c: c.pop("kv_lora_rank"), r"missing field\(s\) \['kv_lora_rank'\]"),
    "missing_linear_field": (lambda c: c["linear_attn_config"].pop("head_dim"),
                             r"linear_attn_config is missing field\(s\) \['head_dim'\]"),
    "rope_mla": (lambda c: c.__setitem__("mla_use_nope", False), r"mla_use_nope must be true"),
    "q_lora": (lambda c: c.__setitem__("q_lora_rank", 64), r"q_lora_rank must be null"),
    "cpu_latent": (lambda c: c.__setitem__("kv_lora_rank", 128),
                   r"kv_lora_rank=128 .*CPU MLA kernel supports only kv_lora_rank=512"),
    "cpu_rope": (lambda c: c.__setitem__("qk_rope_head_dim", 32), r"qk_rope_head_dim=32"),
    "bad_heads": (lambda c: c["linear_attn_config"].__setitem__("num_heads", 0),
                  r"linear_attn_config.num_heads must be a positive integer"),
    "topk": (lambda c: c.__setitem__("num_experts_per_token", 9),
             r"num_experts_per_token=9 exceeds num_experts=8"),
    "router": (lambda c: c.__setitem__("moe_router_activation_func", "relu"),
               r"moe_router_activation_func must be"),
    "moe_freq": (lambda c: c.__setitem__("moe_layer_freq", 0), r"moe_layer_freq must be a positive integer"),
    "dense_count": (lambda c: c.__setitem__("first_k_dense_replace", -1),
                    r"first_k_dense_replace must be an integer >= 0"),
    "mtp_count": (lambda c: c.__setitem__("num_nextn_predict_layers", -1),
                  r"num_nextn_predict_layers must be an integer >= 0"),
    "layer_list_type": (lambda c: c["linear_attn_config"].__setitem__("kda_layers", "1,2,3"),
                        r"kda_layers must be a list of 1-based layer numbers"),
}


def test_dims_are_the_config_typed_and_frozen(cfg):
    """One object carries every dimension the model, layers, planner and builder read."""
    import dataclasses
    d = validate_config(cfg, tp_size=2, on_cpu=True)
    lin = cfg["linear_attn_config"]
    assert (d.kda.num_heads, d.kda.head_dim, d.kda.short_conv_kernel_size) == (
        lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"])
    assert (d.mla.num_heads, d.mla.latent_dim) == (cfg["num_attention_heads"],
                                                   cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    assert (d.moe.num_experts, d.moe.top_k) == (cfg["num_experts"], cfg["num_experts_per_token"])
    assert [d.is_kda(i) for i in range(d.num_layers)] == [
        i + 1 in lin["kda_layers"] for i in range(cfg["num_hidden_layers"])]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.hidden_size = 1
    m = d.all_mla()
    assert not any(m.is_kda(i) for i in range(m.num_layers)) and m.moe == d.moe
    # invariants hold however the object is made, not only from config.json
    with pytest.raises(KimiLinearConfigError, match=r"\[1\] \(1-based\) are in both"):
        dataclasses.replace(d, full_attn_layers=d.full_attn_layers + (1,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_errors_name_the_field(cfg, case):
    edit, pattern = CASES[case]
    with pytest.raises(KimiLinearConfigError, match=pattern) as e:
        validate_config(_with(cfg, edit), tp_size=1, on_cpu=True)
    assert isinstance(e.value, ValueError) and str(e.value).startswith("Kimi Linear config.json: ")


def test_tensor_parallel_divisibility(cfg):
    with pytest.raises(KimiLinearConfigError, match=r"linear_attn_config.num_heads=4 is not divisible "
                                                    r"by the tensor-parallel size 3"):
        validate_config(cfg, tp_size=3)
    c = _with(cfg, lambda c: c["linear_attn_config"].__setitem__("num_heads", 8))
    with pytest.raises(KimiLinearConfigError, match=r"num_attention_heads=4 is not divisible"):
        validate_config(c, tp_size=8)


def test_gpu_allows_other_mla_dims(cfg):
    validate_config(_with(cfg, lambda c: c.__setitem__("kv_lora_rank", 128)), on_cpu=False)


def test_expected_shapes_match_the_builder(tiny, cfg):
    got = {k: tuple(v.shape) for k, v in load_file(str(tiny / "model.safetensors")).items()}
    assert got == KimiLinearDims.from_config(cfg).checkpoint_shapes()


def test_checkpoint_errors_name_the_tensor(cfg):
    exp = KimiLinearDims.from_config(cfg).checkpoint_shapes()
    name = "model.layers.1.self_attn.A_log"
    assert check_tensor(exp, name, (1, 1, 4, 1))
    assert not check_tensor(exp, "model.layers.3.self_attn.rotary_emb.inv_freq", (32,))
    assert check_tensor(exp, name, (4,))  # A_log as [H]: the same values (in-tree vLLM takes both)
    for bad in ((5,), (1, 1, 4, 2), (4, 1)):
        with pytest.raises(KimiLinearCheckpointError, match=rf"tensor {name} has shape {re.escape(str(bad))}, "
                                                            r"but config.json implies \(1, 1, 4, 1\)"):
            check_tensor(exp, name, bad)
    with pytest.raises(KimiLinearCheckpointError, match="dt_bias has shape"):
        check_tensor(exp, "model.layers.1.self_attn.dt_bias", (256, 1))
    seen = set(exp) - {"model.layers.2.self_attn.dt_bias"}
    with pytest.raises(KimiLinearCheckpointError,
                       match=r"tensor model.layers.2.self_attn.dt_bias is missing; expected shape \(256,\)"):
        check_all_present(exp, seen)
    check_all_present(exp, set(exp))


# ------------------------------------------------------------------- through engine start-up

STARTUP = r"""
import sys
from vllm import LLM
if __name__ == "__main__":
    try:
        LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True,
            tensor_parallel_size=int(sys.argv[2]), attention_backend=(sys.argv[3:] or [None])[0])
    except Exception as e:
        print("STARTUP FAILED:", type(e).__name__, str(e))
        sys.exit(3)
    print("STARTED")
"""


def _start(model_dir: Path, tmp_path: Path, tp: int = 1, attention_backend: str | None = None) -> str:
    script = tmp_path / "start.py"
    script.write_text(STARTUP)
    argv = [sys.executable, str(script), str(model_dir), str(tp)] + ([attention_backend] if attention_backend else [])
    r = subprocess.run(argv, cwd=ROOT, env=server_env(VLLM_CPU_KVCACHE_SPACE="1"),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 3, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout + r.stderr


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def test_checkpoint_check_reads_headers_only(tiny, tmp_path):
    from vllm_kimi_linear.checkpoint import check_checkpoint, safetensors_shapes
    cfg = json.loads((tiny / "config.json").read_text())
    assert safetensors_shapes(tiny) == KimiLinearDims.from_config(cfg).checkpoint_shapes()
    check_checkpoint(KimiLinearDims.from_config(cfg), tiny)  # the builder's own checkpoint passes
    d = _copy(tiny, tmp_path / "extra")
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KimiLinearCheckpointError, match="tensor model.layers.0.mlp.up_proj.weight has shape"):
        check_checkpoint(KimiLinearDims.from_config(cfg), d)


def test_engine_start_rejects_bad_layer_lists(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "bad_cfg")
    c = json.loads((d / "config.json").read_text())
    c["linear_attn_config"]["kda_layers"] = [1, 2, 3, 4]
    (d / "config.json").write_text(json.dumps(c))
    out = _start(d, tmp_path)
    # vLLM's config dataclass wraps it: "1 validation error for VllmConfig / Value error, <ours>"
    assert "STARTUP FAILED: ValidationError 1 validation error for VllmConfig" in out
    assert ("Value error, Kimi Linear config.json: layer(s) [4] (1-based) are in both "
            "linear_attn_config.kda_layers and full_attn_layers" in out), out[-4000:]


def test_engine_start_names_missing_and_misshapen_tensors(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "bad_ckpt")
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.1.self_attn.g_b_proj.weight"]
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = _start(d, tmp_path)
    # checked from the safetensors headers in the front-end process: the caller gets our error
    assert ("STARTUP FAILED: ValidationError" in out and "Kimi Linear checkpoint: tensor "
            "model.layers.1.self_attn.g_b_proj.weight is missing; expected shape (256, 64)" in out), out[-4000:]
    w["model.layers.1.self_attn.g_b_proj.weight"] = torch.zeros(256, 32)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = _start(d, tmp_path)
    assert ("STARTUP FAILED: ValidationError" in out and "tensor model.layers.1.self_attn.g_b_proj.weight "
            "has shape (256, 32), but config.json implies (256, 64)" in out), out[-4000:]


def test_engine_start_rejects_a_tp_size_that_does_not_divide_the_heads(tiny, tmp_path):
    out = _start(tiny, tmp_path, tp=3)
    assert "STARTUP FAILED: ValidationError" in out
    assert "not divisible by the tensor-parallel size 3" in out, out[-4000:]


def test_cpu_mla_backend_is_chosen_for_every_x86_cpu():
    """vLLM picks AMX_MLA on a CPU with AMX tiles, and its weight packing refuses float32 deep in a
    worker; for Kimi Linear the plugin picks CPU_MLA unless a backend is named."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kimi_linear.patches.cpu_platform import choose_mla_backend

    def config(backend, dtype):
        return SimpleNamespace(attention_config=SimpleNamespace(backend=backend),
                               model_config=SimpleNamespace(dtype=dtype))

    c = config(None, torch.float32)
    choose_mla_backend(c)
    assert c.attention_config.backend == AttentionBackendEnum.CPU_MLA
    c = config(AttentionBackendEnum.AMX_MLA, torch.bfloat16)
    choose_mla_backend(c)  # named by the user and able to run: kept
    assert c.attention_config.backend == AttentionBackendEnum.AMX_MLA
    with pytest.raises(ValueError, match="AMX_MLA takes bf16/fp16 weights, but the model's dtype is float32"):
        choose_mla_backend(config(AttentionBackendEnum.AMX_MLA, torch.float32))


def test_engine_start_refuses_amx_mla_for_a_float32_model(tiny, tmp_path):
    out = _start(tiny, tmp_path, attention_backend="AMX_MLA")
    assert "STARTUP FAILED" in out and "serve with --dtype bfloat16" in out, out[-4000:]


def test_checkpoint_dtype_must_be_floating_point(tiny, tmp_path):
    from vllm_kimi_linear.checkpoint import check_checkpoint
    cfg = json.loads((tiny / "config.json").read_text())
    for dtype, ok in ((torch.bfloat16, True), (torch.float16, True), (torch.int32, False),
                      (torch.float8_e4m3fn, False)):
        d = _copy(tiny, tmp_path / str(dtype).split(".")[-1])
        w = load_file(str(d / "model.safetensors"))
        w["model.norm.weight"] = w["model.norm.weight"].to(dtype)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        if ok:
            check_checkpoint(KimiLinearDims.from_config(cfg), d)
        else:
            with pytest.raises(KimiLinearCheckpointError,
                               match=r"tensor model.norm.weight has dtype (I32|F8_E4M3), but it "
                                     r"must be a floating-point tensor"):
                check_checkpoint(KimiLinearDims.from_config(cfg), d)


def test_speculative_decoding_is_refused_at_config_time():
    """The KDA layer keeps no draft-token state: the config hook refuses, before any worker."""
    from vllm_kimi_linear.hooks import KimiLinearConfigHook
    with pytest.raises(ValueError, match="does not support speculative decoding yet: serve without "
                                         "--speculative-config"):
        KimiLinearConfigHook.verify_and_update_config(SimpleNamespace(speculative_config=object()))


def _mla(nope=128, rope=64, v=128):
    from vllm_kimi_linear.config import MLADims
    return MLADims(num_heads=4, kv_lora_rank=512, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v)


def test_cuda_refuses_float32_and_mla_dims_no_prefill_kernel_takes():
    """On CUDA the config hook asks vLLM's MLA prefill selector (here: a stand-in that accepts
    only the published dims, as vLLM's FLASH_ATTN prefill on Hopper does) before any worker."""
    from vllm.v1.attention.backends.mla.prefill.base import MLADimensions

    from vllm_kimi_linear.cuda_checks import check_cuda_mla

    class Hopper:
        @staticmethod
        def get_mla_prefill_backend_cls(sel):
            if sel.mla_dimensions != MLADimensions(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128):
                raise ValueError(f"No valid MLA prefill backend found with {sel}")
            return object

    check_cuda_mla(torch.bfloat16, _mla(), Hopper)
    with pytest.raises(ValueError, match="no float32 MLA attention kernel; serve with --dtype bfloat16"):
        check_cuda_mla(torch.float32, _mla(), Hopper)
    with pytest.raises(ValueError, match=r"takes qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64 .*"
                                         r"--qk-nope 128 --qk-rope 64 --v-head 128"):
        check_cuda_mla(torch.bfloat16, _mla(nope=64, v=64), Hopper)


def test_micro_batching_is_refused_at_config_time():
    """DBO hands the layers per-micro-batch metadata lists the KDA layer does not read: refused
    before any worker, never silently skipped."""
    from vllm_kimi_linear.hooks import KimiLinearConfigHook
    cfg = SimpleNamespace(speculative_config=None, parallel_config=SimpleNamespace(use_ubatching=True))
    with pytest.raises(ValueError, match="does not support micro-batching yet: serve without --enable-dbo"):
        KimiLinearConfigHook.verify_and_update_config(cfg)


@pytest.mark.parametrize("flag", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallelism_is_refused_at_config_time(flag):
    """A KDA layer scans every token of its sequence on one rank; context parallelism (tokens or
    their KV cache split across ranks) is refused before any worker starts."""
    from vllm_kimi_linear.hooks import KimiLinearConfigHook
    pc = SimpleNamespace(use_ubatching=False, decode_context_parallel_size=1, prefill_context_parallel_size=1)
    setattr(pc, flag, 2)
    cfg = SimpleNamespace(speculative_config=None, parallel_config=pc)
    with pytest.raises(ValueError, match="does not support context parallelism: .* serve without "
                                         "--decode-context-parallel-size / --prefill-context-parallel-size"):
        KimiLinearConfigHook.verify_and_update_config(cfg)


def test_context_parallelism_flags_reach_the_hook(tiny):
    """The same refusal through vLLM's own config building, from the command-line flag."""
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(tiny), tensor_parallel_size=2, decode_context_parallel_size=2)
    with pytest.raises(Exception, match="does not support context parallelism"):
        args.create_engine_config()


def test_fp8_kv_cache_on_cpu_is_refused_at_start_up(tiny):
    """vLLM 0.32's CPU MLA kernels assert on an FP8 latent cache at the first prompt (the engine
    died there, seen here before this check): refused while the config is built."""
    from vllm.engine.arg_utils import EngineArgs
    with pytest.raises(Exception, match=r"on CPU: --kv-cache-dtype fp8 is not supported by vLLM's CPU "
                                        r"MLA kernels .* serve with the default --kv-cache-dtype auto"):
        EngineArgs(model=str(tiny), kv_cache_dtype="fp8").create_engine_config()
    EngineArgs(model=str(tiny)).create_engine_config()  # the default cache builds


def test_tied_embeddings_with_pipeline_parallelism_are_refused(tiny, tmp_path):
    """The embedding (first stage) and lm_head (last stage) cannot be one tensor: the hook says so."""
    from vllm_kimi_linear.hooks import KimiLinearConfigHook
    d = _copy(tiny, tmp_path / "tied")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    vc = SimpleNamespace(
        speculative_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(use_ubatching=False, tensor_parallel_size=1, pipeline_parallel_size=2,
                                        decode_context_parallel_size=1, prefill_context_parallel_size=1,
                                        enable_expert_parallel=False),
        model_config=SimpleNamespace(model=str(d), tokenizer=str(d), hf_config=None, dtype=torch.float32,
                                     quantization=None, tokenizer_mode="auto"))
    with pytest.raises(ValueError, match="tie_word_embeddings=true with --pipeline-parallel-size > 1"):
        KimiLinearConfigHook.verify_and_update_config(vc)
    vc.parallel_config.pipeline_parallel_size = 1
    KimiLinearConfigHook.verify_and_update_config(vc)  # without PP, tied embeddings serve


def test_expert_parallelism_on_cpu_is_refused_at_start_up(tiny):
    """vLLM 0.32's CPU MoE kernels ignore the expert map (a worker segfaults at its first forward,
    seen here): the config hook refuses before any worker starts."""
    from vllm import LLM
    with pytest.raises(Exception, match="on CPU: --enable-expert-parallel is not supported by vLLM's "
                                        "CPU MoE kernels"):
        LLM(model=str(tiny), tensor_parallel_size=2, enable_expert_parallel=True, enforce_eager=True)
