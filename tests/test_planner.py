"""The capacity planner (vllm_kimi_linear/tools/planner.py).

1. Against vLLM itself: for the tiny hybrid and the tiny all-MLA checkpoints (vLLM's defaults, so
   prefix caching on: the KDA state in "align" mode), vLLM's start-up line
   "CPU KV cache size: N tokens, Maximum concurrency for L tokens per request: X" (float32,
   VLLM_CPU_KVCACHE_SPACE=1) must equal the planner's numbers for a 1 GiB budget. Both engines
   start in subprocesses (their own logs, no state left in this process), side by side.
2. Published-config numbers, by hand from kimi-linear.md.
3. Bad arguments give one clear error.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from vllm_kimi_linear.tools import planner
from vllm_kimi_linear.tools.builder import build_tiny_checkpoint

GiB = 1024 ** 3
MAX_LEN = 5000  # not a multiple of the block size: covers the per-request rounding up
ENGINE = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from vllm import LLM
        LLM(model=sys.argv[1], dtype="float32", max_model_len=int(sys.argv[2]), enforce_eager=True)
""")
LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                  r"request: ([\d.]+)x")


@pytest.fixture(scope="module")
def vllm_logs(tmp_path_factory):
    """{variant: (tokens, max_model_len, concurrency string)} as vLLM logs them."""
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "kimi_linear" not in plugins.split(","):
        pytest.skip("VLLM_PLUGINS excludes kimi_linear")
    d = tmp_path_factory.mktemp("planner")
    script = d / "engine.py"
    script.write_text(ENGINE)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_PLUGINS")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    procs = {}
    for variant, mla in (("hybrid", False), ("all_mla", True)):
        model = build_tiny_checkpoint(d / variant, all_mla=mla)
        procs[variant] = (model, subprocess.Popen(
            [sys.executable, str(script), str(model), str(MAX_LEN)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for variant, (model, p) in procs.items():
        try:
            log, _ = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            p.kill()
            log, _ = p.communicate()
        m = LINE.search(log)
        assert m, f"{variant}: no KV cache line in vLLM's log (rc={p.returncode}):\n{log[-3000:]}"
        out[variant] = (model, int(m[1].replace(",", "")), int(m[2].replace(",", "")), m[3])
    return out


@pytest.mark.parametrize("variant", ["hybrid", "all_mla"])
def test_planner_equals_vllm_startup_log(vllm_logs, variant):
    model, tokens, max_len, concurrency = vllm_logs[variant]
    dims = planner.load_dims(str(model))
    p = planner.plan(dims, tp=1, kv_budget_bytes=1 * GiB, max_model_len=MAX_LEN, dtype="float32")
    assert max_len == MAX_LEN
    assert (p.kv_cache_tokens, f"{p.max_concurrency:.2f}") == (tokens, concurrency)


def test_published_numbers_tp8():
    dims = planner.load_dims("published")
    h = planner.plan(dims, tp=8, kv_budget_bytes=60 * GiB)
    assert (h.mla_layers, h.kda_layers) == (7, 20)
    assert h.mla_bytes_per_token == 576 * 2 * 7 == 8064  # replicated: not divided by TP
    # per KDA layer: conv (4-1) x 3*32*128/8 bf16 + recurrent 32/8 x 128 x 128 fp32
    assert h.kda_state_bytes_per_request == 20 * (3 * 1536 * 2 + 4 * 128 * 128 * 4) == 5_427_200
    # weights: every checkpoint tensor, sharded /8 except the replicated ones
    shapes = dims.checkpoint_shapes()
    n = sum(planner.math.prod(s) for s in shapes.values())
    assert 49e9 < n < 49.5e9  # "48B" model: 49.1 B parameters in the checkpoint
    assert h.weights_bytes_per_gpu == planner.weight_bytes_per_gpu(dims, 8, "bfloat16")
    assert n * 2 / 8 < h.weights_bytes_per_gpu < n * 2 / 8 * 1.01
    # hybrid block: smallest multiple of 128 with 128*1152*k >= one KDA layer state (271,360 B)
    assert (h.block_size, h.page_bytes) == (256, 256 * 1152)
    assert (h.group_size, h.mla_groups, h.kda_groups) == (7, 1, 3)
    # prefix caching (vLLM's default) keeps 2 KDA state blocks per group per request, else 1
    assert h.blocks_per_request == 1048576 // 256 + 2 * 3
    off = planner.plan(dims, tp=8, kv_budget_bytes=60 * GiB, prefix_caching=False)
    assert off.blocks_per_request == 1048576 // 256 + 3
    m = planner.plan(dims.all_mla(), tp=8, kv_budget_bytes=60 * GiB)
    assert m.mla_bytes_per_token == 576 * 2 * 27
    assert m.kda_state_bytes_per_request == 0
    assert 3.5 < h.max_concurrency / m.max_concurrency < 4


def test_pipeline_parallel_uses_the_bounding_stage():
    p = planner.plan(planner.load_dims("published"), tp=8, pp=2, kv_budget_bytes=60 * GiB)
    assert [len(r) for r in planner.pp_layers(27, 2)] == [14, 13]
    # stage 0 (layers 0..13) holds MLA layers 3, 7, 11; stage 1 holds 15, 19, 23, 26 and bounds
    assert p.mla_layers == 4
    assert p.pp == 2


def test_cli_json_and_table(capsys):
    assert planner.main(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hybrid"]["mla_bytes_per_token"] == 8064
    assert out["all_mla"]["mla_bytes_per_token"] == 31104
    assert planner.main(["--gpu-mem-gib", "141"]) == 0
    assert "hybrid/all-MLA" in capsys.readouterr().out
    # --gpu: that GPU's memory, and the deploy flags the manifests use for it
    assert planner.main(["--gpu", "h100", "--pp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deploy"] == planner.asdict(planner.deploy_plan("h100", 8, 2))
    assert out["hybrid"]["full_length_requests"] == out["deploy"]["full_context_requests"] == 13
    assert planner.main(["--deploy-table"]) == 0
    assert capsys.readouterr().out.strip() == planner.deploy_table()


@pytest.mark.parametrize("args, message", [
    (["--tp", "0"], "--tp must be a positive integer"),
    (["--tp", "3"], "not divisible by the tensor-parallel size 3"),
    (["--pp", "28"], "--pp 28 exceeds num_hidden_layers=27"),
    (["--max-model-len", "-1"], "--max-model-len must be a positive integer"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--kv-budget-gib", "0"], "--kv-budget-gib must be positive"),
    (["--overhead-gib", "-1"], "--overhead-gib must be >= 0"),
    (["--tp", "1", "--gpu-mem-gib", "40"], "no memory is left for the KV cache"),
    (["--config", "/nonexistent/config.json"], "no such file"),
])
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        planner.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
