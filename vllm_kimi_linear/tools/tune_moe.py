"""Tune vLLM's fused MoE kernel for Kimi Linear's expert shape on this GPU (offline, GPU only).

    python -m vllm_kimi_linear.tools.tune_moe --out DIR [--tp 1 2 4 8] [--batches 1 16 64 ...]
    python -m vllm_kimi_linear.tools.tune_moe --out DIR --from-summary tune_moe.json   # no GPU

vLLM picks the Triton MoE kernel's tile sizes from a JSON file per (experts, intermediate size per
GPU, device), `E=256,N=1024,device_name=NVIDIA_H200.json` for Kimi-Linear-48B-A3B at TP 1 on an
H200, and falls back to generic defaults when it has none ("Using default MoE config.
Performance might be sub-optimal!"). vLLM 0.32 ships none for this model's shapes on an H200
(bf16), at any TP. This times every configuration of a search space per batch size, each as a
CUDA-graph replay of `fused_experts` on random bf16 weights of the published dimensions and a
uniform random routing, and writes the best per batch size in vLLM's format (DIR/E=...json),
with the default's time beside it (DIR/tune_moe.json). The engine reads such files from
$VLLM_TUNED_CONFIG_FOLDER. `--max-seconds` bounds each TP's search, shared equally by its batch sizes (the best
so far is kept). The summary holds everything the files are made of, so `--from-summary` writes
them again anywhere: the lent GPU machine returns no file whose name has vLLM's `=` and `,`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from .planner import published_config

# Kimi-Linear-48B-A3B's MoE, from its published config
_PUBLISHED = published_config()
EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = (_PUBLISHED[k] for k in ("num_experts", "hidden_size",
                                                               "moe_intermediate_size",
                                                               "num_experts_per_token"))
# vLLM uses the entry nearest the step's token count: decode batches, then chunked-prefill steps
# (8,192 tokens a step by default)
BATCHES = (1, 16, 64, 256, 1024, 8192)
# The batch sizes of the written file: vLLM's own tuning list, and 8,192. A file with the tuned
# sizes alone would hand every other token count its nearest tuned neighbour's tiles (4,096
# tokens those of 1,024); these keys hold vLLM's default for that size where nothing was tuned.
FILE_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192)


def search_space(M: int) -> list[dict]:
    """Tiles for M tokens. M * top_k / E tokens reach an expert on average: up to a few, the
    smallest M tile, and the kernel is bound by reading the experts' weights (N and K tiles,
    warps, pipeline depth); with many, the GEMM tiles matter. Kept small (48-96 configurations,
    each compiled once) so a TP's search fits a few minutes of a lent GPU."""
    per_expert = M * TOP_K / EXPERTS
    if per_expert <= 4:
        space = itertools.product((16,), (32, 64, 128, 256), (64, 128, 256), (1,), (4, 8), (3, 4))
    elif per_expert <= 64:
        space = itertools.product((16, 32, 64), (64, 128, 256), (64, 128), (1,), (4, 8), (3, 4))
    else:
        space = itertools.product((64, 128), (64, 128, 256), (64, 128), (1, 16), (4, 8), (3, 4))
    return [{"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": g,
             "num_warps": w, "num_stages": s} for bm, bn, bk, g, w, s in space]


def make_weights(N: int, device="cuda", seed: int = 0):
    """The experts' weights, once per TP (3.6 GB at TP 1): w1 [E, 2N, hidden] (gate|up),
    w2 [E, hidden, N]."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    bf = dict(dtype=torch.bfloat16, device=device)
    return (torch.randn(EXPERTS, 2 * N, HIDDEN, generator=g, **bf) * 0.02,
            torch.randn(EXPERTS, HIDDEN, N, generator=g, **bf) * 0.02)


def make_case(M: int, weights, device="cuda", seed: int = 0):
    """fused_experts' operands for M tokens: x [M, hidden], the weights, a uniform random top-k."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, HIDDEN, generator=g, dtype=torch.bfloat16, device=device) * 0.1
    scores = torch.rand(M, EXPERTS, generator=g, device=device)
    topk_weights, topk_ids = scores.topk(TOP_K, dim=-1)
    return x, *weights, topk_weights, topk_ids.to(torch.int32)


def time_us(case, config: dict | None, timer=None) -> float:
    """One fused_experts call with `config` (None: what vLLM would pick), in microseconds."""
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    if timer is None:
        import triton.testing
        timer = triton.testing.do_bench_cudagraph
    with override_config(config):  # read at call time, so also while the graph is captured
        return timer(lambda: fused_experts(*case)) * 1e3


def tune(tp: int, batches, max_seconds: float, timer=None, device="cuda") -> dict:
    """{M: (best config, its us, the default's us)} for intermediate size INTERMEDIATE / tp."""
    N = INTERMEDIATE // tp
    weights = make_weights(N, device)
    out = {}
    for M in batches:
        case = make_case(M, weights, device, seed=M)
        default_us = time_us(case, None, timer)
        best, best_us, t0 = None, float("inf"), time.time()
        for cfg in search_space(M):
            if time.time() - t0 > max_seconds / len(batches):  # each batch size its share
                print(f"  M={M}: search stopped at its time share", flush=True)
                break
            try:
                us = time_us(case, cfg, timer)
            except Exception as e:  # a tile the compiler or the GPU's shared memory refuses
                print(f"  M={M} {cfg}: {type(e).__name__}", flush=True)
                continue
            if us < best_us:
                best, best_us = cfg, us
        if best is None or best_us >= default_us:
            best, best_us = None, default_us  # nothing beat vLLM's default: leave M to it
        out[M] = (best, best_us, default_us)
        print(f"TP={tp} N={N} M={M}: default {default_us:.1f} us, best {best_us:.1f} us "
              f"({default_us / best_us:.2f}x) {best}", flush=True)
    return out


def vllm_default(M: int, N: int) -> dict:
    """The tiles vLLM picks for M tokens when it has no file (bf16), in the file's format."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config
    cfg = get_default_config(M, EXPERTS, N, HIDDEN, TOP_K, None, None)
    cfg.pop("SPLIT_K", None)  # set by the kernel's caller, not read from files
    return cfg


def file_table(tp: int, results: dict) -> dict[int, dict]:
    """{M: config} for every FILE_BATCHES size and every tuned size: the tuned configuration
    where one beat vLLM's default, vLLM's default elsewhere (so the file changes nothing but the
    sizes tuning improved and the token counts nearest them)."""
    N = INTERMEDIATE // tp
    tuned = {M: cfg for M, (cfg, _, _) in results.items() if cfg is not None}
    return {M: tuned.get(M) or vllm_default(M, N) for M in sorted(set(FILE_BATCHES) | set(results))}


def write_vllm_config(out_dir: Path, tp: int, results: dict, name: str | None = None,
                      triton_version: str | None = None) -> Path | None:
    """vLLM's file for this shape (None where the default won at every tuned size). `name`: the
    file name for this GPU (default: vLLM's for the GPU here); `triton_version`: recorded in the
    file (default: this Triton's)."""
    if all(cfg is None for cfg, _, _ in results.values()):
        return None
    if name is None:
        from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name
        name = get_config_file_name(EXPERTS, INTERMEDIATE // tp, None)
    if triton_version is None:
        import triton
        triton_version = triton.__version__
    table = {str(M): cfg for M, cfg in file_table(tp, results).items()}
    path = out_dir / name
    path.write_text(json.dumps({"triton_version": triton_version, **table}, indent=4) + "\n")
    return path


def from_summary(summary: dict, out_dir: Path) -> list[Path]:
    """vLLM's files again from a tune_moe.json: its file names, tuned configurations and times."""
    paths = []
    for key, tp_summary in summary.items():
        if not key.startswith("tp") or tp_summary["file"] is None:
            continue
        results = {r["M"]: (r["config"], r["best_us"], r["default_us"]) for r in tp_summary["rows"]}
        paths.append(write_vllm_config(out_dir, int(key[2:]), results, tp_summary["file"],
                                       summary.get("triton_version", "not recorded")))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--max-seconds", type=float, default=240.0, help="search time per TP")
    ap.add_argument("--from-summary", type=Path, help="write vLLM's files from this tune_moe.json, no tuning")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.from_summary:
        for path in from_summary(json.loads(a.from_summary.read_text()), a.out):
            print(path)
        return 0
    import triton
    summary = {"triton_version": triton.__version__}
    for tp in a.tp:
        res = tune(tp, a.batches, a.max_seconds)
        path = write_vllm_config(a.out, tp, res)
        summary[f"tp{tp}"] = {"file": path.name if path else None,
                              "rows": [{"M": M, "default_us": round(d, 2), "best_us": round(b, 2),
                                        "speedup": round(d / b, 3), "config": c}
                                       for M, (c, b, d) in res.items()]}
        (a.out / "tune_moe.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
