"""An FP8 block-quantized checkpoint served on the GPU with vLLM's defaults, against float64.

The builder's tiny model (every quantized dimension a whole number of 128-blocks) is quantized by
`vllm_kimi_linear.tools.quantize` as DeepSeek-V3 / Kimi-K2 store FP8; the float64 reference runs
its dequantized twin (the weights the FP8 checkpoint stands for). vLLM's block-FP8 GEMMs also
quantize every quantized layer's input (per token, 128-wide groups, dynamic scale), which no
bf16 comparison can stand for: on the H200 (2026-12-03) the FP8 server's median |logprob
difference| was 0.33 nats where the twin served in bf16 had 0.066. So the FP8 server is held to
the FP8 precision floor: the reference run again with bf16-rounded activations and those inputs
quantized as vLLM does (`kimi_linear_ref.fp8_activations`, checked against vLLM's own quantizer
in tests/test_quantization.py); measured on the CPU for this checkpoint and these prompts:
median 0.345, mean 0.634 nats. The served median and mean may be at most FP8_FACTOR times the
floor's + 0.05 nats. Misapplied scales or a misplaced shard move them by whole nats.

The twin is served in bf16 too, held to the bf16 floor as tests/gpu/test_gpu_serving.py does: a
failure of the FP8 server alone then points at the quantized path. Results go to
gpu_checks.jsonl.

The FP8 server names vLLM's CUTLASS block-FP8 GEMM (`--linear-backend cutlass`, compiled into
vLLM; KIMI_GPU_FP8_LINEAR_BACKEND=auto for vLLM's own choice). vLLM's default on Hopper
(FlashInfer + DeepGEMM) builds FlashInfer's FP8 block-scale GEMM from source during graph
capture on a machine without its kernel cache ("Building JIT module fp8_blockscale_gemm_90"):
on the lent H200 that build was still running when a 425 s call ended (2026-12-03). What this
test checks, the checkpoint's scales and shards as the plugin loads them, every FP8 kernel
reads the same way.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.engine_util import prompt
from tests.gpu.test_gpu_serving import BF16_FACTOR
from tests.gpu.gpu_util import (DRY_RUN_ON_CPU, GPU_MLA_DIMS, IMPL, SERVED, References, ServerConfig, Served,
                                diff_stats, prompt_logprobs, record, requires_cuda)
from vllm_kimi_linear.tools.harness import impl_env, vllm_serve

pytestmark = [requires_cuda,
              pytest.mark.skipif(IMPL != "plugin", reason="the plugin's FP8 path (vLLM's in-tree "
                                                          "class has its own checkpoint format)")]
FP8_FACTOR = 1.5  # the floor emulates the FP8 rounding itself; the server rounds in a few more places
FP8_TINY = dict(kda_heads=2, kda_head_dim=128, moe_inter=256, dtype="bfloat16", **GPU_MLA_DIMS)
LENGTHS = (17, 300, 900)
FP8_LINEAR_BACKEND = os.environ.get("KIMI_GPU_FP8_LINEAR_BACKEND", "cutlass")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
    from vllm_kimi_linear.tools.quantize import dequantized_checkpoint, quantize_checkpoint
    root = tmp_path_factory.mktemp("fp8")
    fp8 = quantize_checkpoint(build_tiny_checkpoint(root / "source", **FP8_TINY), root / "fp8")
    return {"fp8": fp8, "twin": dequantized_checkpoint(fp8, root / "twin")}


def _served_logprobs(name: str, model_dir, extra: tuple[str, ...] = ()) -> torch.Tensor:
    from tests.gpu.gpu_util import RESULTS
    log = RESULTS / f"server-{IMPL}-{name}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    # on a CPU dry run the "GPU" memory fraction is of the host's RAM, shared with the references
    args = ["--dtype", "bfloat16", *extra] + (["--gpu-memory-utilization", "0.3"] if DRY_RUN_ON_CPU else [])
    with vllm_serve(model_dir, SERVED, args, impl_env(IMPL), log) as base:
        s = Served(ServerConfig(name, "tiny", "bfloat16"), base, model_dir, log, 0.0)
        return torch.cat([prompt_logprobs(s, prompt(n, salt=n))[0] for n in LENGTHS])


def test_fp8_checkpoint_logprobs_within_the_fp8_floor(checkpoints):
    from tests.reference import kimi_linear_ref as ref
    from safetensors import safe_open
    refs = References(checkpoints["twin"])
    with safe_open(str(checkpoints["fp8"] / "model.safetensors"), "pt") as f:
        quantized = [refs.ours.w[k.removesuffix("_scale_inv")] for k in f.keys() if k.endswith(".weight_scale_inv")]
    exact, bf16_floor, fp8_floor = [], [], []
    for n in LENGTHS:
        ids = prompt(n, salt=n)
        exact.append(refs.prompt_logprobs(ids)["ref"])
        with ref.rounded_activations():
            bf16_floor.append(ref.prompt_logprobs(refs.ours, ids))
            with ref.fp8_activations(quantized):
                fp8_floor.append(ref.prompt_logprobs(refs.ours, ids))
    exact, bf16_floor, fp8_floor = map(torch.cat, (exact, bf16_floor, fp8_floor))
    floors = {"bf16": diff_stats(bf16_floor, exact), "fp8": diff_stats(fp8_floor, exact)}
    bf16 = diff_stats(_served_logprobs("fp8-twin-bf16", checkpoints["twin"]), exact)
    fp8 = diff_stats(_served_logprobs("fp8", checkpoints["fp8"], ("--linear-backend", FP8_LINEAR_BACKEND)),
                     exact)
    record("fp8", "fp8_vs_fp8_floor", lengths=list(LENGTHS), fp8=fp8, bf16=bf16, fp8_floor=floors["fp8"],
           bf16_floor=floors["bf16"], fp8_factor=FP8_FACTOR, bf16_factor=BF16_FACTOR,
           linear_backend=FP8_LINEAR_BACKEND)
    for k in ("median", "mean"):  # 1,214 tokens pooled
        assert bf16[k] <= BF16_FACTOR * floors["bf16"][k] + 0.05, ("bf16 twin", k, bf16, floors["bf16"])
        assert fp8[k] <= FP8_FACTOR * floors["fp8"][k] + 0.05, ("fp8", k, fp8, floors["fp8"])
