"""The deploy flags for Kimi-Linear-48B-A3B at 1M-token context (deploy/README.md), from the
capacity planner.

    python deploy/capacity.py                 # the README table (TP=8, PP=1 and PP=2; H100, H200)
    python deploy/capacity.py --tp 8 --pp 2 --gpu h100 --json

All memory arithmetic is vllm_kimi_linear.planner's (weights tensor by tensor as our layers shard
them, vLLM's hybrid block layout, the KDA state in prefix-caching "align" mode); this file only
names the GPUs and turns the plan into the manifests' flags (--max-num-seqs for requests of a
typical length, --max-num-batched-tokens). Needs the package installed (no vLLM, no torch).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from vllm_kimi_linear import planner

GiB = 1024 ** 3
MiB = 1024 ** 2

# Memory the driver reports for the whole device (nvidia-smi "Total", MiB).
GPUS = {"h100": 81559 * MiB, "h200": 143771 * MiB}


@dataclass
class Plan:
    gpu: str
    tp: int
    pp: int
    max_model_len: int
    gpu_memory_utilization: float
    overhead_gib: float
    weights_gib: float
    mla_bytes_per_token: int
    mla_gib_per_request: float
    kda_mib_per_request: float
    kv_budget_gib: float
    full_context_requests: int
    max_num_seqs: int
    max_num_batched_tokens: int


def plan(gpu: str = "h100", tp: int = 8, pp: int = 1, max_model_len: int = 1048576,
         gpu_memory_utilization: float = 0.92, overhead_gib: float = 4.0, typical_len: int = 32768,
         max_num_batched_tokens: int = 8192) -> Plan:
    """The stage that bounds capacity, on one GPU of a TP x PP replica.

    overhead_gib: activations of one max_num_batched_tokens step, CUDA graphs, NCCL buffers; an
    assumption to check against vLLM's "Available KV cache memory" log line.
    max_num_seqs: how many requests of `typical_len` tokens fit (rounded down to a multiple of 8,
    between 8 and 256); full-length requests are limited by the KV blocks, not by this flag.
    """
    kw = dict(tp=tp, pp=pp, gpu_mem_bytes=GPUS[gpu], gpu_memory_utilization=gpu_memory_utilization,
              overhead_bytes=int(overhead_gib * GiB))
    cfg = planner.published_config()
    full = planner.plan(cfg, max_model_len=max_model_len, **kw)
    typical = planner.plan(cfg, max_model_len=typical_len, **kw)
    seqs = max(8, min(256, typical.full_length_requests // 8 * 8))
    return Plan(gpu, tp, pp, max_model_len, gpu_memory_utilization, overhead_gib,
                full.weights_bytes_per_gpu / GiB, full.mla_bytes_per_token,
                full.mla_bytes_per_token * max_model_len / GiB,
                full.kda_state_bytes_per_request / MiB, full.kv_budget_bytes / GiB,
                full.full_length_requests, seqs, max_num_batched_tokens)


def table() -> str:
    rows = ["| GPU | TP x PP | weights/GPU | MLA bytes/token/GPU | MLA per 1M request | KDA state/request "
            "| KV budget/GPU | 1M-token requests | --max-num-seqs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for pp in (1, 2):
        for gpu in ("h100", "h200"):
            q = plan(gpu, 8, pp)
            rows.append(f"| {gpu.upper()} | 8 x {pp} | {q.weights_gib:.1f} GiB | {q.mla_bytes_per_token} B "
                        f"| {q.mla_gib_per_request:.2f} GiB | {q.kda_mib_per_request:.2f} MiB "
                        f"| {q.kv_budget_gib:.1f} GiB | {q.full_context_requests} | {q.max_num_seqs} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", choices=sorted(GPUS), default=None)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=1048576)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.gpu is None:
        print(table())
        return 0
    try:
        q = plan(a.gpu, a.tp, a.pp, a.max_model_len, a.gpu_memory_utilization)
    except ValueError as e:
        ap.exit(2, f"capacity: error: {e}\n")
    print(json.dumps(asdict(q), indent=2) if a.json else q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
