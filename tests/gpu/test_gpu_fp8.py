"""An FP8 block-quantized checkpoint served on the GPU with vLLM's defaults, against the bf16 model.

The builder's tiny model (every quantized dimension a whole number of 128-blocks) is quantized by
`vllm_kimi_linear.tools.quantize` as DeepSeek-V3 / Kimi-K2 store FP8; its dequantized twin (the
weights the FP8 checkpoint stands for) is served in bf16 beside it, and both are compared with
the float64 reference of the twin's weights on the same prompts. On the GPU, vLLM's block-FP8
GEMMs also quantize activations (per token, 128-wide groups), so the FP8 server is allowed more
than the bf16 one: its median |logprob difference| at most FP8_FACTOR times the bf16 server's
+ 0.05 nats. Misapplied scales or a misplaced shard move the median by whole nats.

Both servers run in turn (each with the GPU to itself); results go to gpu_checks.jsonl.

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
from tests.gpu.gpu_util import (DRY_RUN_ON_CPU, GPU_MLA_DIMS, IMPL, SERVED, References, ServerConfig, Served,
                                diff_stats, prompt_logprobs, record, requires_cuda)
from vllm_kimi_linear.tools.harness import impl_env, vllm_serve

pytestmark = [requires_cuda,
              pytest.mark.skipif(IMPL != "plugin", reason="the plugin's FP8 path (vLLM's in-tree "
                                                          "class has its own checkpoint format)")]
FP8_FACTOR = 2
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


def test_fp8_checkpoint_logprobs_close_to_the_bf16_model(checkpoints):
    refs = References(checkpoints["twin"])
    exact = torch.cat([refs.prompt_logprobs(prompt(n, salt=n))["ref"] for n in LENGTHS])
    bf16 = diff_stats(_served_logprobs("fp8-twin-bf16", checkpoints["twin"]), exact)
    fp8 = diff_stats(_served_logprobs("fp8", checkpoints["fp8"], ("--linear-backend", FP8_LINEAR_BACKEND)),
                     exact)
    record("fp8", "fp8_vs_bf16_twin", lengths=list(LENGTHS), fp8=fp8, bf16=bf16,
           factor=FP8_FACTOR, linear_backend=FP8_LINEAR_BACKEND)
    assert fp8["median"] <= FP8_FACTOR * bf16["median"] + 0.05, (fp8, bf16)
