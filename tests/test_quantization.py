"""FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2 layout): the quantizer against vLLM's
own block cast, the start-up checks on quantization tensors, and serving on CPU (vLLM's AMX FP8
W8A16 kernels) against the checkpoint's dequantized twin served unquantized.

Served comparisons are teacher-forced (prompt logprobs), in bfloat16 on both sides (vLLM serves
FP8 with bf16/fp16 activations only): the tiny random model amplifies bf16 rounding along a
prompt, so the measure is the top-1 log-probability at each position and how often the top-1
tokens agree, with a control (the unquantized source weights) that shows the measure sees the
quantization error itself.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.engine_util import kimi_llm, prompt
from vllm_kimi_linear.checkpoint import (KimiLinearCheckpointError, check_checkpoint, quant_scheme,
                                         safetensors_headers)
from vllm_kimi_linear.config import KimiLinearDims
from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
from vllm_kimi_linear.tools.quantize import (dequantize_block, dequantized_checkpoint,
                                             quantize_block, quantize_checkpoint)

# Every quantized dimension a whole number of 128-blocks at TP 1 and 2 (vLLM's block-FP8 rule):
# KDA head_dim 128, MoE/shared intermediate 256.
FP8_TINY = dict(kda_heads=2, kda_head_dim=128, moe_inter=256)
PROMPTS = [prompt(n, salt) for salt, n in enumerate((24, 31, 40, 17, 60, 24, 33, 48))]

needs_amx = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                               reason="requires a CPU with AMX tiles (vLLM's CPU FP8 GEMM kernels)")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = build_tiny_checkpoint(root / "source", **FP8_TINY)
    fp8 = quantize_checkpoint(src, root / "fp8")
    return {"source": src, "fp8": fp8, "twin": dequantized_checkpoint(fp8, root / "twin")}


def _dims(d) -> tuple[KimiLinearDims, dict]:
    cfg = json.loads((d / "config.json").read_text())
    return KimiLinearDims.from_config(cfg), cfg


# ---- the quantizer

def test_reference_fp8_inputs_equal_vllms_group_quantizer():
    """tests/reference's FP8 activation emulation (the floor tests/gpu/test_gpu_fp8.py holds the
    FP8 server to) quantizes a bf16 input exactly as vLLM's dynamic per-token, 128-group FP8
    quantizer does, and only inside fp8_activations() and only for the weights it names."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    from tests.reference import kimi_linear_ref as ref
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 384, generator=g) * torch.logspace(-3, 1, 384)).bfloat16()
    x[2, 128:256] = 0  # an all-zero group: the smallest scale, not a division by zero
    with set_current_vllm_config(VllmConfig()):  # a CustomOp reads it when built
        q, scale = QuantFP8(False, GroupShape(1, 128)).forward_native(x)
    theirs = (q.double().view(7, 3, 128) * scale.double()[..., None]).view(7, 384)
    ours = ref._fp8_groups(x.double())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x.double())  # the emulation does round
    w, other = torch.randn(5, 384, dtype=torch.float64), torch.randn(5, 384, dtype=torch.float64)
    plain = x.double() @ w.T
    with ref.fp8_activations([w]):
        assert torch.equal(ref.linear(x.double(), w, round_output=False), theirs @ w.T)
        assert torch.equal(ref.linear(x.double(), other, round_output=False), x.double() @ other.T)
    assert torch.equal(ref.linear(x.double(), w, round_output=False), plain)


@pytest.mark.parametrize("shape", [(256, 384), (576, 256), (100, 130), (2, 128)])
def test_quantizer_equals_vllms_block_cast(shape):
    from vllm.utils.deep_gemm import per_block_cast_to_fp8
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    w[0, 0] = 3.0  # one outlier block
    q, s = quantize_block(w, (128, 128))
    vq, vs = per_block_cast_to_fp8(w, [128, 128])
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == vs.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    torch.testing.assert_close(s, vs.float(), rtol=1e-6, atol=0)
    # vLLM multiplies by a float32 reciprocal, we divide in float64: a code may differ by one step
    ours, theirs = dequantize_block(q, s, (128, 128)), dequantize_block(vq, vs, (128, 128))
    assert (q.view(torch.uint8) == vq.view(torch.uint8)).float().mean() > 0.99
    step = s.double().repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    assert ((ours - theirs).abs() <= ours.abs() / 8 + step / 2 ** 9).all()
    # e4m3 keeps 3 mantissa bits: each weight within half a step of its block-scaled grid
    assert ((ours - w.double()).abs() <= w.double().abs() / 16 + step / 2 ** 10).all()


def test_fp8_checkpoint_layout(dirs):
    headers = safetensors_headers(dirs["fp8"])
    dims, cfg = _dims(dirs["fp8"])
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["ignored_layers"] == [f"model.layers.{i}.self_attn.b_proj"
                                    for i in range(dims.num_layers) if dims.is_kda(i)]
    a = "model.layers.0.self_attn."
    assert headers[a + "q_proj.weight"]["dtype"] == "F8_E4M3"
    assert headers[a + "q_proj.weight_scale_inv"] == {**headers[a + "q_proj.weight_scale_inv"],
                                                      "dtype": "F32", "shape": [2, 2]}
    assert headers["model.layers.1.block_sparse_moe.experts.3.w2.weight"]["dtype"] == "F8_E4M3"
    for kept in (a + "b_proj.weight", a + "A_log", a + "q_conv1d.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.1.block_sparse_moe.gate.weight", "model.norm.weight"):
        assert headers[kept]["dtype"] == "F32", kept
        assert kept.rsplit(".", 1)[0] + ".weight_scale_inv" not in headers
    check_checkpoint(dims, dirs["fp8"], quant_scheme(cfg))
    check_checkpoint(*_dims(dirs["twin"])[:1], dirs["twin"])


# ---- start-up checks

def _edit(src, dst, tensors=None, config=None):
    """A copy of checkpoint `src` with tensors / config.json fields replaced (None: removed)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    for k, v in (tensors or {}).items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _check(d):
    dims, cfg = _dims(d)
    check_checkpoint(dims, d, quant_scheme(cfg))


def test_missing_scale_is_named(dirs, tmp_path):
    name = "model.layers.3.self_attn.kv_b_proj.weight_scale_inv"
    with pytest.raises(KimiLinearCheckpointError, match=f"tensor {name} is missing"):
        _check(_edit(dirs["fp8"], tmp_path / "c", tensors={name: None}))


def test_scales_without_quantization_config_are_refused(dirs, tmp_path):
    d = _edit(dirs["fp8"], tmp_path / "c", config={"quantization_config": None})
    with pytest.raises(KimiLinearCheckpointError, match="weight_scale_inv.*quantization tensor, but "
                                                        "config.json has no quantization_config"):
        _check(d)


def test_fp8_weight_of_an_ignored_layer_is_refused(dirs, tmp_path):
    name = "model.layers.0.self_attn.b_proj.weight"
    d = _edit(dirs["fp8"], tmp_path / "c", tensors={name: torch.zeros(2, 256).to(torch.float8_e4m3fn)})
    with pytest.raises(KimiLinearCheckpointError, match=f"{name} has dtype F8_E4M3, but it must be a "
                                                        "floating-point tensor"):
        _check(d)


def test_unquantized_weight_where_fp8_is_declared_is_refused(dirs, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    d = _edit(dirs["fp8"], tmp_path / "c", tensors={name: torch.zeros(256, 512)})
    with pytest.raises(KimiLinearCheckpointError, match=f"{name} has dtype F32, but it must be an FP8"):
        _check(d)


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method is 'awq'; this plugin serves unquantized "
                                         "checkpoints and 'fp8' ones"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "weight_block_size is None; FP8 "
                                                             "checkpoints are served block-quantized"),
])
def test_unserved_quantization_is_refused_by_name(qc, match):
    with pytest.raises(KimiLinearCheckpointError, match=match):
        quant_scheme({"quantization_config": qc})


def test_online_quantization_is_refused_at_start_up(dirs):
    from vllm import LLM
    with pytest.raises(Exception, match="--quantization fp8 on a checkpoint whose config.json "
                                        "quantization_config is None: online quantization is not "
                                        "supported"):
        LLM(model=str(dirs["source"]), dtype="bfloat16", quantization="fp8", enforce_eager=True)


# ---- served

def _top1(model_dir, tp: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 logprob, top-1 token) at every prompt position after the first, all prompts."""
    from vllm import SamplingParams
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else None
    with kimi_llm(model_dir, env=env, dtype="bfloat16", max_model_len=256,
                  tensor_parallel_size=tp) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    best = [max((v.logprob, k) for k, v in d.items()) for o in outs for d in o.prompt_logprobs[1:]]
    return np.array([b[0] for b in best]), np.array([b[1] for b in best])


@pytest.fixture(scope="module")
def twin_top1(dirs):
    return _top1(dirs["twin"])


def _distance(a, b) -> tuple[float, float]:
    """(mean |top-1 logprob difference|, fraction of positions whose top-1 tokens agree)"""
    return float(np.abs(a[0] - b[0]).mean()), float((a[1] == b[1]).mean())


@needs_amx
@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_served_equals_its_dequantized_twin(dirs, twin_top1, tp):
    fp8 = _top1(dirs["fp8"], tp)
    mean, agree = _distance(fp8, twin_top1)
    # measured: TP 1 about 0.04 / 0.97, TP 2 about 0.08 / 0.91 (TP adds its own bf16 reductions);
    # scales misapplied or a shard misplaced give garbage (mean > 1)
    assert mean < 0.12 and agree > 0.85, (tp, mean, agree)


@needs_amx
def test_control_the_measure_sees_quantization_error(dirs, twin_top1):
    """The source weights (before quantization), served the same way, are measurably further from
    the twin than the FP8 server is: the tolerance above is not loose enough to hide FP8's
    rounding."""
    mean, agree = _distance(_top1(dirs["source"]), twin_top1)
    assert mean > 0.15 and agree < 0.85, (mean, agree)
