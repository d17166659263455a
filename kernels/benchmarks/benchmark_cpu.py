"""CPU benchmark: our chunked KDA against fla-core's naive references, side by side.

    python kernels/benchmarks/benchmark_cpu.py [--lengths 1024 4096 16384] [--json kda_cpu_bench.json]

Runs are interleaved (ours, naive_recurrent, naive_chunk, ours, ...) and each ratio is the median
of per-round ratios, so a noisy machine shifts both sides of a ratio together. B=1, H=4,
K=V=128, float32, log-decay in [-1, 0]. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a script from a checkout (the GPU machine has no install of this package): the
# operators (kernels/) are found beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from kimi_kda.kda.cpu import chunk_kda_torch, fused_recurrent_kda_torch


def _inputs(T, H=4, K=128, V=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen)
    g = -torch.rand(1, T, H, K, generator=gen)
    beta = torch.rand(1, T, H, generator=gen)
    return q, k, v, g, beta


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="kda_cpu_bench.json")
    args = ap.parse_args(argv)
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda

    rows = []
    for T in args.lengths:
        x = _inputs(T)
        impls = {
            "ours_chunk": lambda: chunk_kda_torch(*x),
            "fla_naive_recurrent": lambda: naive_recurrent_kda(*x),
            "fla_naive_chunk": lambda: naive_chunk_kda(*x),
        }
        if T <= 4096:
            impls["ours_recurrent"] = lambda: fused_recurrent_kda_torch(*x)
        for fn in impls.values():  # warm-up
            fn() if T <= 4096 else None
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(_time(fn))
        ours = times["ours_chunk"]
        row = {"T": T, **{f"{n}_s": statistics.median(t) for n, t in times.items()}}
        for ref in ("fla_naive_recurrent", "fla_naive_chunk"):
            row[f"speedup_vs_{ref}"] = statistics.median(r / o for r, o in zip(times[ref], ours))
        rows.append(row)

    print(f"{'T':>6} {'ours chunk s':>13} {'naive rec s':>12} {'naive chunk s':>14} "
          f"{'x vs rec':>9} {'x vs chunk':>11}")
    for r in rows:
        print(f"{r['T']:>6} {r['ours_chunk_s']:>13.4f} {r['fla_naive_recurrent_s']:>12.4f} "
              f"{r['fla_naive_chunk_s']:>14.4f} {r['speedup_vs_fla_naive_recurrent']:>9.2f} "
              f"{r['speedup_vs_fla_naive_chunk']:>11.2f}")
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "shape": "B=1 H=4 K=V=128 float32", "rounds": args.rounds}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
