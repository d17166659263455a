"""The multi-node manifest's `vllm serve` flags, as rendered from deploy/k8s/multi-node, start a
server on this CPU machine and answer, with what a CPU can run of them: pipeline parallelism and
the manifest's scheduler limits kept; tensor parallelism 8 -> 1, the Ray executor -> vLLM's
multiprocessing one (vLLM on CPU refuses Ray), the tiny checkpoint and a 4K context for the
published model and 1M. Each substitution is listed in `cpu_variant`, so a flag added to the
manifest reaches this server unless it is one of those.
"""
from __future__ import annotations

import requests

from deploy_helpers import all_serve_arg_lists
from vllm_kimi_linear.tools.harness import server_env, vllm_serve

LEADER = "k8s/multi-node:LeaderWorkerSet/kimi-linear-multinode/leaderTemplate/vllm-leader"
# flag -> value on CPU (None: dropped); flags the harness sets itself are dropped too
CPU_VALUES = {"--tensor-parallel-size": "1", "--distributed-executor-backend": "mp",
              "--max-model-len": "4096", "--gpu-memory-utilization": None,
              "--served-model-name": None, "--host": None, "--port": None}


def cpu_variant(args: list[str]) -> list[str]:
    """The manifest's flags (model dropped) with CPU_VALUES applied; every flag here takes a value."""
    flags = args[1:]
    out = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in CPU_VALUES:
            value = CPU_VALUES[flag]
        if value is not None:
            out += [flag, value]
    return out


def test_multi_node_flags_start_a_pipeline_parallel_server_on_cpu(tiny_model_dir, tmp_path):
    leader = all_serve_arg_lists()[LEADER]
    args = cpu_variant(leader)
    assert args[args.index("--pipeline-parallel-size") + 1] == "2", args  # PP as the manifest has it
    assert {"--max-num-seqs", "--max-num-batched-tokens"} <= set(args)
    env = server_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    with vllm_serve(tiny_model_dir, "kimi-linear", [*args, "--dtype", "float32"], env,
                    tmp_path / "server.log") as base:
        r = requests.post(base + "/v1/completions", timeout=120,
                          json={"model": "kimi-linear", "prompt": "The quick brown fox", "max_tokens": 8,
                                "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    log = (tmp_path / "server.log").read_text()
    assert "pipeline_parallel_size=2" in log, log[-2000:]
