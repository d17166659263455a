"""GPU memory arithmetic for serving Kimi-Linear-48B-A3B at 1M-token context (deploy/README.md).

    python deploy/capacity.py                 # the README table (TP=8, PP=1 and PP=2; H100, H200)
    python deploy/capacity.py --tp 8 --pp 2 --gpu h100 --json

Stand-alone (no vLLM, no torch). Numbers follow the published config (hidden 2304, 27 layers: 20 KDA
+ 7 MLA, vocab 163840, 256 routed experts of 1024 + 1 shared, layer 0 dense with 9216) and how vLLM
shards a model with tensor parallelism: attention heads, expert intermediate dims and the vocabulary
split across TP ranks; the MLA latent (kv_lora_rank + qk_rope) is one vector per token and layer,
REPLICATED on every TP rank (never divided by TP); the KDA state is per request, split by heads.
Pipeline parallelism splits the layers across nodes; the stage holding the most MLA layers bounds
the context a replica can hold.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

GiB = 1024 ** 3
MiB = 1024 ** 2


@dataclass(frozen=True)
class KimiLinearDims:
    hidden: int = 2304
    layers: int = 27
    kda_layers: int = 20
    mla_layers: int = 7
    vocab: int = 163840
    kda_heads: int = 32
    kda_head_dim: int = 128
    conv_kernel: int = 4
    mla_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    experts: int = 256
    shared_experts: int = 1
    moe_inter: int = 1024
    dense_layers: int = 1
    dense_inter: int = 9216
    gate_rank: int = 128  # KDA low-rank forget/output gate projections (f_a/f_b, g_a/g_b)
    weight_bytes: int = 2  # bf16
    kv_bytes: int = 2  # bf16 MLA latent cache
    state_bytes: int = 4  # KDA recurrent state kept in fp32
    conv_bytes: int = 2  # conv state in the activation dtype (bf16)


# Memory the driver reports for the whole device (nvidia-smi "Total", MiB).
GPUS = {"h100": 81559 * MiB, "h200": 143771 * MiB}


def param_counts(d: KimiLinearDims = KimiLinearDims()) -> dict[str, int]:
    """Parameters by part (whole model, not per GPU)."""
    h = d.hidden
    kda_dim = d.kda_heads * d.kda_head_dim
    kda = (3 * h * kda_dim            # q, k, v projections
           + kda_dim * h              # o_proj
           + 2 * (h * d.gate_rank + d.gate_rank * kda_dim)  # f_a/f_b and g_a/g_b
           + h * d.kda_heads          # beta
           + 3 * kda_dim * d.conv_kernel  # short convs on q, k, v
           + 2 * d.kda_heads + kda_dim + 2 * h)  # A_log, dt_bias, o_norm, 2 RMSNorms
    mla = (h * d.mla_heads * (d.qk_nope + d.qk_rope)   # q_proj (q_lora_rank is None)
           + h * (d.kv_lora_rank + d.qk_rope)           # kv_a_proj_with_mqa
           + d.kv_lora_rank * d.mla_heads * (d.qk_nope + d.v_head)  # kv_b_proj
           + d.mla_heads * d.v_head * h                 # o_proj
           + d.kv_lora_rank + 2 * h)                    # kv_a_layernorm, 2 RMSNorms
    moe_layers = d.layers - d.dense_layers
    moe = moe_layers * ((d.experts + d.shared_experts) * 3 * h * d.moe_inter + d.experts * h + d.experts)
    dense = d.dense_layers * 3 * h * d.dense_inter
    emb = 2 * d.vocab * h  # embed_tokens + lm_head (untied)
    return {"embeddings": emb, "kda_attention": d.kda_layers * kda, "mla_attention": d.mla_layers * mla,
            "moe": moe, "dense_mlp": dense, "total": emb + d.kda_layers * kda + d.mla_layers * mla + moe + dense + h}


def mla_bytes_per_token(d: KimiLinearDims = KimiLinearDims(), mla_layers: int | None = None) -> int:
    """Latent KV bytes per token on EACH GPU: layers x (kv_lora_rank + qk_rope) x bytes; no /TP."""
    n = d.mla_layers if mla_layers is None else mla_layers
    return n * (d.kv_lora_rank + d.qk_rope) * d.kv_bytes


def kda_state_bytes_per_request(tp: int, d: KimiLinearDims = KimiLinearDims(), kda_layers: int | None = None) -> int:
    """Per request on EACH GPU: layers x (H/TP x K x V x fp32 + 3 convs x (H*K/TP) x (kernel-1) x bf16)."""
    n = d.kda_layers if kda_layers is None else kda_layers
    heads = d.kda_heads // tp
    recurrent = heads * d.kda_head_dim * d.kda_head_dim * d.state_bytes
    conv = 3 * (d.kda_heads * d.kda_head_dim // tp) * (d.conv_kernel - 1) * d.conv_bytes
    return n * (recurrent + conv)


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
         max_num_batched_tokens: int = 8192, d: KimiLinearDims = KimiLinearDims()) -> Plan:
    """Per-GPU budget of the worst pipeline stage.

    overhead_gib: activations of one max_num_batched_tokens step, CUDA graphs, NCCL buffers; an
    assumption to check against vLLM's "Available KV cache memory" log line.
    max_num_seqs: how many requests of `typical_len` tokens fit (rounded down to a multiple of 8,
    capped at 256); full-length requests are limited by the KV blocks, not by this flag.
    """
    p = param_counts(d)
    # every big matrix is split by TP; the worst PP stage holds ceil(layers/pp) of the layers and
    # (for simplicity) one of the two vocabulary matrices
    per_layer = (p["total"] - p["embeddings"]) / d.layers
    stage_layers = math.ceil(d.layers / pp)
    stage_params = per_layer * stage_layers + (p["embeddings"] if pp == 1 else p["embeddings"] / 2)
    weights = stage_params * d.weight_bytes / tp
    mla_stage = math.ceil(d.mla_layers / pp)  # every 4th layer is MLA: stages split them evenly
    kda_stage = math.ceil(d.kda_layers / pp)
    per_tok = mla_bytes_per_token(d, mla_stage)
    kda_req = kda_state_bytes_per_request(tp, d, kda_stage)
    budget = gpu_memory_utilization * GPUS[gpu] - weights - overhead_gib * GiB
    full = int(budget // (per_tok * max_model_len + kda_req))
    typical = int(budget // (per_tok * typical_len + kda_req))
    seqs = max(8, min(256, typical // 8 * 8))
    return Plan(gpu, tp, pp, max_model_len, gpu_memory_utilization, overhead_gib, weights / GiB,
                per_tok, per_tok * max_model_len / GiB, kda_req / MiB, budget / GiB, full, seqs,
                max_num_batched_tokens)


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
        p = param_counts()
        print(f"parameters: {p['total'] / 1e9:.2f} B ({p['total'] * 2 / 1e9:.1f} GB in bf16)\n")
        print(table())
        return 0
    q = plan(a.gpu, a.tp, a.pp, a.max_model_len, a.gpu_memory_utilization)
    print(json.dumps(asdict(q), indent=2) if a.json else q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
