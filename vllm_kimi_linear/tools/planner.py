"""Capacity planner: how many long requests a Kimi Linear deployment holds, and what an all-MLA
model of the same dimensions would hold.

    python -m vllm_kimi_linear.tools.planner                       # published config, TP=8, 80 GiB, 1M
    python -m vllm_kimi_linear.tools.planner --config DIR/config.json --tp 1 --kv-budget-gib 1 --json
    python -m vllm_kimi_linear.tools.planner --gpu h100 --tp 8 --pp 2  # + the deploy flags for it
    python -m vllm_kimi_linear.tools.planner --deploy-table            # deploy/README.md's table

This module owns the arithmetic from a config dict to (a) weight bytes per GPU, counted tensor by
tensor from `KimiLinearDims.checkpoint_shapes()` and sharded the way our layers shard them, and (b) the
KV cache pool exactly as vLLM 0.32 lays it out for a hybrid model, so that its token and
concurrency figures equal vLLM's start-up line "KV cache size: N tokens, Maximum concurrency for
L tokens per request: X" for the same budget (tests/test_planner.py starts vLLM to check):
  * block size: the smallest multiple of 128 whose MLA page (block x 576 x dtype) covers one
    KDA state (platforms/interface.py `_align_hybrid_block_size`); KDA pages are padded to that
    page. A config with no KDA layer is not hybrid for vLLM (the config hook says so), so the
    all-MLA variant keeps the MLA kernel block (16);
  * groups: layers of each kind are split into groups of min(#MLA, #KDA) layers (the smaller
    kind's count, or the larger when it is < 1.5x), the last group of a kind padded
    (kv_cache_utils `_get_kv_cache_groups_uniform_page_size`); one block id = one page in every
    layer of a group, so a pool block costs group_size x page bytes;
  * per request at max_model_len: cdiv(len, block) blocks per MLA group, plus per KDA group 2
    blocks with prefix caching (vLLM's default; mamba cache mode "align": the running state and
    the one carried over a block boundary) or 1 without (mode "none");
    concurrency = num_blocks / blocks per request, tokens = int(concurrency x max_model_len).
The MLA latent (kv_lora_rank + qk_rope) is one shared head, replicated on every TP rank; the KDA
state is split by heads. (c) The deploy manifests' memory flags for a GPU (`deploy_plan`):
--max-num-seqs for requests of a typical length, from the same arithmetic.
No vLLM import: pure arithmetic on the config's dimensions.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import KimiLinearDims, validate_config

GiB = 1024 ** 3
MiB = 1024 ** 2
# The device memory vLLM sizes against (torch.cuda.mem_get_info's total, a little under nvidia-smi's
# "Total"): H200 139.8 GiB as vLLM logged it on a lent H200 (2026-12-03; nvidia-smi: 143,771 MiB);
# H100 80 GB 79.1 GiB, what PyTorch reports for that card (not measured here; nvidia-smi: 81,559 MiB).
GPUS = {"h100": int(79.1 * GiB), "h200": int(139.8 * GiB)}
# Per GPU beyond weights and KV cache: activations of one 8192-token step, CUDA graphs, NCCL and
# non-torch memory. Measured on that H200 (published 48B config, TP 1, vLLM's defaults): 0.92 x
# 139.8 GiB - 91.54 GiB of weights - 31.7 GiB "Available KV cache memory" = 5.4 GiB.
OVERHEAD_GIB = 5.4
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
HYBRID_ALIGN = 128  # vLLM rounds a hybrid MLA model's block to a multiple of 128 tokens
MLA_KERNEL_BLOCK = 16  # smallest MLA kernel block (CPU MLA; FlashMLA's 64 also divides 128)
# Never sharded by TP: norms, low-rank down projections, the MLA latent projection, the router.
REPLICATED = ("layernorm.weight", "model.norm.weight", "o_norm.weight", "f_a_proj.weight",
              "g_a_proj.weight", "kv_a_proj_with_mqa.weight", "gate.weight",
              "e_score_correction_bias")
FP32_PARAMS = ("A_log", "dt_bias")  # kept in fp32 whatever the model dtype


class PlannerError(ValueError):
    """A planner argument that cannot describe a deployment; the message names it."""


def published_config() -> dict:
    """Kimi-Linear-48B-A3B-Instruct's config (the fields of kimi-linear.md's table)."""
    kda = [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)]
    return {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
            "hidden_size": 2304, "num_hidden_layers": 27, "vocab_size": 163840,
            "intermediate_size": 9216, "num_attention_heads": 32, "q_lora_rank": None,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "mla_use_nope": True, "num_experts": 256,
            "num_experts_per_token": 8, "num_shared_experts": 1, "moe_intermediate_size": 1024,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_router_activation_func": "sigmoid",
            "num_expert_group": 1, "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "linear_attn_config": {
                "num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4,
                "kda_layers": kda, "full_attn_layers": [4, 8, 12, 16, 20, 24, 27]}}


def pp_layers(num_layers: int, pp: int) -> list[range]:
    """vLLM's default split (distributed/utils.get_pp_indices): the remainder goes to the stages
    before the last one."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    starts = [sum(parts[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, parts)]


def weight_bytes_per_gpu(dims: KimiLinearDims, tp: int, dtype: str, layers: range | None = None,
                         first: bool = True, last: bool = True) -> int:
    """Bytes of the parameters one GPU holds: the layers of its stage, the embedding on the first
    stage, the final norm and lm_head on the last; each tensor /tp unless in REPLICATED."""
    total = 0
    for name, shape in dims.checkpoint_shapes().items():
        if name.startswith("model.layers."):
            if layers is not None and int(name.split(".")[2]) not in layers:
                continue
        elif name.startswith("model.embed_tokens") and not first:
            continue
        elif not name.startswith("model.embed_tokens") and not last:
            continue
        n = math.prod(shape)
        if not name.endswith(REPLICATED):
            n //= tp
        total += n * (4 if name.endswith(FP32_PARAMS) else DTYPE_BYTES[dtype])
    return total


def mla_bytes_per_token_layer(dims: KimiLinearDims, dtype: str) -> int:
    return dims.mla.latent_dim * DTYPE_BYTES[dtype]


def kda_state_bytes_layer(dims: KimiLinearDims, tp: int, dtype: str) -> int:
    """One KDA layer's state per request on one GPU: conv (K-1, 3*H*D/tp) in the model dtype plus
    recurrent (H/tp, D, D) fp32 (vLLM MambaStateShapeCalculator.kda_state_shape)."""
    H, D, K = dims.kda.num_heads, dims.kda.head_dim, dims.kda.short_conv_kernel_size
    return (K - 1) * (3 * H * D // tp) * DTYPE_BYTES[dtype] + (H // tp) * D * D * 4


@dataclass
class Plan:
    model: str  # "hybrid" or "all-MLA"
    tp: int
    pp: int
    dtype: str
    max_model_len: int
    mla_layers: int  # on the stage that bounds capacity
    kda_layers: int
    weights_bytes_per_gpu: int  # the heaviest stage
    kv_budget_bytes: int
    block_size: int
    page_bytes: int  # per layer per block, KDA pages padded to it
    group_size: int
    mla_groups: int
    kda_groups: int
    prefix_caching: bool  # KDA groups in "align" mode: 2 resident state blocks per request
    mla_bytes_per_token: int  # per GPU, all MLA layers of the stage
    kda_state_bytes_per_request: int  # per GPU, unpadded
    num_blocks: int
    blocks_per_request: int
    max_concurrency: float  # vLLM's "Maximum concurrency for max_model_len tokens per request"
    kv_cache_tokens: int  # vLLM's "KV cache size: N tokens"
    full_length_requests: int  # whole requests of max_model_len that fit at once


def _stage_plan(dims, tp, layers, budget, max_model_len, dtype, prefix_caching):
    n_mla = sum(not dims.is_kda(i) for i in layers)
    n_kda = len(layers) - n_mla
    tok = mla_bytes_per_token_layer(dims, dtype)
    state = kda_state_bytes_layer(dims, tp, dtype)
    block = MLA_KERNEL_BLOCK
    if n_mla and dims.kda_layers:  # _align_hybrid_block_size (an all-MLA config is not hybrid)
        block = max(block, HYBRID_ALIGN)
        block = block * math.ceil(state / (block * tok))
    page = block * tok if n_mla else state
    counts = [n for n in (n_mla, n_kda) if n]
    group = min(counts)
    if max(counts) < 1.5 * group:
        group = max(counts)
    mla_groups, kda_groups = math.ceil(n_mla / group), math.ceil(n_kda / group)
    num_blocks = budget // (group * page)
    per_req = mla_groups * math.ceil(max_model_len / block) + kda_groups * (2 if prefix_caching else 1)
    return dict(mla_layers=n_mla, kda_layers=n_kda, block_size=block, page_bytes=page,
                group_size=group, mla_groups=mla_groups, kda_groups=kda_groups,
                prefix_caching=prefix_caching,
                mla_bytes_per_token=n_mla * tok, kda_state_bytes_per_request=n_kda * state,
                num_blocks=num_blocks, blocks_per_request=per_req)


def plan(dims: KimiLinearDims, tp: int = 8, pp: int = 1, kv_budget_bytes: int | None = None,
         max_model_len: int = 1048576, dtype: str = "bfloat16", gpu_mem_bytes: int = 80 * GiB,
         gpu_memory_utilization: float = 0.92, overhead_bytes: int = int(OVERHEAD_GIB * GiB),
         model: str = "hybrid", prefix_caching: bool = True) -> Plan:
    """Capacity of one replica. kv_budget_bytes is the KV pool per GPU (vLLM's "Available KV cache
    memory", or VLLM_CPU_KVCACHE_SPACE on CPU); when None it is estimated as
    utilization x GPU memory - weights - overhead_bytes (activations of one step, CUDA graphs,
    NCCL buffers: OVERHEAD_GIB by default, measured at TP 1 on an H200; for other setups read the
    real figure from vLLM's "Available KV cache memory" line and pass it as kv_budget_bytes)."""
    _check_args(dims, tp, pp, kv_budget_bytes, max_model_len, dtype, gpu_mem_bytes,
                gpu_memory_utilization)
    if overhead_bytes < 0:
        raise PlannerError(f"--overhead-gib must be >= 0, got {overhead_bytes / GiB:g}")
    stages = pp_layers(dims.num_layers, pp)
    weights = [weight_bytes_per_gpu(dims, tp, dtype, r, i == 0, i == pp - 1)
               for i, r in enumerate(stages)]
    best = None
    for r, w in zip(stages, weights):
        budget = kv_budget_bytes if kv_budget_bytes is not None else \
            int(gpu_memory_utilization * gpu_mem_bytes) - w - overhead_bytes
        if budget <= 0:
            raise PlannerError(f"weights need {w / GiB:.1f} GiB per GPU: no memory is left for the "
                               "KV cache; raise --tp/--pp or --gpu-mem-gib")
        s = _stage_plan(dims, tp, r, budget, max_model_len, dtype, prefix_caching)
        s["kv_budget_bytes"] = budget
        conc = s["num_blocks"] / s["blocks_per_request"]
        if best is None or conc < best[0]:
            best = (conc, s)
    conc, s = best
    return Plan(model=model, tp=tp, pp=pp, dtype=dtype, max_model_len=max_model_len,
                weights_bytes_per_gpu=max(weights), max_concurrency=conc,
                kv_cache_tokens=int(conc * max_model_len), full_length_requests=int(conc), **s)


def _check_args(dims, tp, pp, budget, max_model_len, dtype, gpu_mem, util):
    if dtype not in DTYPE_BYTES:
        raise PlannerError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    for name, v in (("--tp", tp), ("--pp", pp), ("--max-model-len", max_model_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PlannerError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < util <= 1:
        raise PlannerError(f"--gpu-memory-utilization must be in (0, 1], got {util}")
    if budget is not None and budget <= 0:
        raise PlannerError(f"--kv-budget-gib must be positive, got {budget / GiB:g}")
    if budget is None and gpu_mem <= 0:
        raise PlannerError(f"--gpu-mem-gib must be positive, got {gpu_mem / GiB:g}")
    if pp > dims.num_layers:
        raise PlannerError(f"--pp {pp} exceeds num_hidden_layers={dims.num_layers}")
    dims.check_servable(tp_size=tp)  # TP must divide heads and intermediate sizes


def load_dims(path: str) -> KimiLinearDims:
    """The dimensions of a config.json, a model directory, or 'published'."""
    if path == "published":
        return validate_config(published_config())
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise PlannerError(f"--config {path}: no such file (give a config.json, a model "
                           "directory, or 'published')")
    return validate_config(json.loads(p.read_text()))


@dataclass
class DeployPlan:
    """What the deploy manifests set for one GPU of a TP x PP replica of the published model."""
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


def deploy_plan(gpu: str = "h100", tp: int = 8, pp: int = 1, max_model_len: int = 1048576,
                gpu_memory_utilization: float = 0.92, overhead_gib: float = OVERHEAD_GIB,
                typical_len: int = 32768, max_num_batched_tokens: int = 8192,
                dims: KimiLinearDims | None = None) -> DeployPlan:
    """The stage that bounds capacity, on one GPU of a TP x PP replica.

    overhead_gib: activations of one max_num_batched_tokens step, CUDA graphs, NCCL buffers; an
    assumption to check against vLLM's "Available KV cache memory" log line.
    max_num_seqs: how many requests of `typical_len` tokens fit (rounded down to a multiple of 8,
    between 8 and 256); full-length requests are limited by the KV blocks, not by this flag.
    """
    if gpu not in GPUS:
        raise PlannerError(f"--gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    kw = dict(tp=tp, pp=pp, gpu_mem_bytes=GPUS[gpu], gpu_memory_utilization=gpu_memory_utilization,
              overhead_bytes=int(overhead_gib * GiB))
    dims = dims or validate_config(published_config())
    full = plan(dims, max_model_len=max_model_len, **kw)
    typical = plan(dims, max_model_len=typical_len, **kw)
    seqs = max(8, min(256, typical.full_length_requests // 8 * 8))
    return DeployPlan(gpu, tp, pp, max_model_len, gpu_memory_utilization, overhead_gib,
                      full.weights_bytes_per_gpu / GiB, full.mla_bytes_per_token,
                      full.mla_bytes_per_token * max_model_len / GiB,
                      full.kda_state_bytes_per_request / MiB, full.kv_budget_bytes / GiB,
                      full.full_length_requests, seqs, max_num_batched_tokens)


def deploy_table() -> str:
    """deploy/README.md's memory table: the published model at TP=8, PP 1 and 2, H100 and H200."""
    rows = ["| GPU | TP x PP | weights/GPU | MLA bytes/token/GPU | MLA per 1M request | KDA state/request "
            "| KV budget/GPU | 1M-token requests | --max-num-seqs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for pp in (1, 2):
        for gpu in ("h100", "h200"):
            q = deploy_plan(gpu, 8, pp)
            rows.append(f"| {gpu.upper()} | 8 x {pp} | {q.weights_gib:.1f} GiB | {q.mla_bytes_per_token} B "
                        f"| {q.mla_gib_per_request:.2f} GiB | {q.kda_mib_per_request:.2f} MiB "
                        f"| {q.kv_budget_gib:.1f} GiB | {q.full_context_requests} | {q.max_num_seqs} |")
    return "\n".join(rows)


def report(h: Plan, m: Plan) -> str:
    def row(label, f):
        return f"{label:<40} {f(h):>18} {f(m):>18}"
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    mib = lambda b: f"{b / 2 ** 20:.2f} MiB"  # noqa: E731
    lines = [f"TP={h.tp} PP={h.pp} dtype={h.dtype} max_model_len={h.max_model_len:,}",
             f"{'':<40} {'hybrid':>18} {'all-MLA':>18}",
             row("MLA / KDA layers (bounding stage)", lambda p: f"{p.mla_layers} / {p.kda_layers}"),
             row("weights per GPU", lambda p: gib(p.weights_bytes_per_gpu)),
             row("KV budget per GPU", lambda p: gib(p.kv_budget_bytes)),
             row("MLA latent bytes/token/GPU", lambda p: f"{p.mla_bytes_per_token:,} B"),
             row(f"MLA cache per {h.max_model_len:,}-token request",
                 lambda p: gib(p.mla_bytes_per_token * p.max_model_len)),
             row("KDA state per request per GPU", lambda p: mib(p.kda_state_bytes_per_request)),
             row("block size (tokens) / page", lambda p: f"{p.block_size} / {p.page_bytes:,} B"),
             row("pool blocks / blocks per request", lambda p: f"{p.num_blocks:,} / {p.blocks_per_request:,}"),
             row("KV cache size (tokens)", lambda p: f"{p.kv_cache_tokens:,}"),
             row("max concurrency at max_model_len", lambda p: f"{p.max_concurrency:.2f}x"),
             row("concurrent full-length requests", lambda p: str(p.full_length_requests))]
    ratio = h.mla_bytes_per_token / m.mla_bytes_per_token
    lines.append(f"KV bytes per token: hybrid/all-MLA = {ratio:.3f} ({1 - ratio:.1%} less); "
                 f"concurrency x{h.max_concurrency / m.max_concurrency:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="published", help="config.json, model dir, or 'published'")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--gpu", choices=sorted(GPUS), default=None,
                    help="the GPU's memory (instead of --gpu-mem-gib), and print the deploy flags for it")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--overhead-gib", type=float, default=OVERHEAD_GIB,
                    help="activations/CUDA graphs/NCCL per GPU, subtracted when estimating")
    ap.add_argument("--kv-budget-gib", type=float, default=None, help="KV pool per GPU (overrides)")
    ap.add_argument("--max-model-len", type=int, default=1048576)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="plan for `vllm serve --no-enable-prefix-caching` (1 KDA block per group)")
    ap.add_argument("--deploy-table", action="store_true",
                    help="print deploy/README.md's table (published model, TP=8, H100/H200, PP 1/2)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.deploy_table:
        print(deploy_table())
        return 0
    try:
        dims = load_dims(a.config)
        budget = None if a.kv_budget_gib is None else int(a.kv_budget_gib * GiB)
        mem = GPUS[a.gpu] if a.gpu else int(a.gpu_mem_gib * GiB)
        kw = dict(tp=a.tp, pp=a.pp, kv_budget_bytes=budget, max_model_len=a.max_model_len,
                  dtype=a.dtype, gpu_mem_bytes=mem, gpu_memory_utilization=a.gpu_memory_utilization,
                  overhead_bytes=int(a.overhead_gib * GiB), prefix_caching=not a.no_prefix_caching)
        h = plan(dims, model="hybrid", **kw)
        m = plan(dims.all_mla(), model="all-MLA", **kw)
        flags = deploy_plan(a.gpu, a.tp, a.pp, a.max_model_len, a.gpu_memory_utilization,
                            a.overhead_gib, dims=dims) if a.gpu else None
    except ValueError as e:
        ap.exit(2, f"planner: error: {e}\n")
    if a.json:
        out = {"hybrid": asdict(h), "all_mla": asdict(m)} | ({"deploy": asdict(flags)} if flags else {})
        print(json.dumps(out, indent=2))
    else:
        print(report(h, m))
        if flags:
            print(f"deploy flags ({a.gpu.upper()}): --max-model-len {flags.max_model_len} "
                  f"--gpu-memory-utilization {flags.gpu_memory_utilization} --max-num-seqs "
                  f"{flags.max_num_seqs} --max-num-batched-tokens {flags.max_num_batched_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
