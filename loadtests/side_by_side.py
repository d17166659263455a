"""This plugin against vLLM's in-tree Kimi Linear on one GPU: the same server flags, the same rows.

    # on the GPU machine, once per implementation (the plugin installed for `plugin` only):
    python -m loadtests.side_by_side run --impl plugin --out DIR
    python -m loadtests.side_by_side run --impl intree --out DIR
    python -m loadtests.side_by_side report DIR        # the ratio table (markdown) + DIR/ratios.json

Serves Kimi-Linear-48B-A3B's published config with `--load-format dummy` (the builder's
`--published-config`: dimensions exactly as published, random weights, no download) with vLLM's
defaults (CUDA graphs, async scheduling, chunked prefill, prefix caching), and measures each row
with vLLM's own `vllm bench serve` (random prompts of an exact token count, `--ignore-eos`):
prefill throughput at 8K/32K/128K prompts (one request at a time, 1 output token), and decode at
a 32K context with 1, 16 and 64 concurrent requests (output tokens/s, TPOT). One warm-up round
first, so no row pays for kernel compilation. Every `vllm bench serve` JSON is kept in DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = {  # name: (input tokens, output tokens, prompts, concurrency, the row's figure)
    "prefill-8k": (8192, 1, 8, 1, "input_throughput"),
    "prefill-32k": (32768, 1, 4, 1, "input_throughput"),
    "prefill-128k": (131072, 1, 2, 1, "input_throughput"),
    "decode-32k-c1": (32768, 128, 1, 1, "output_throughput"),
    "decode-32k-c16": (32768, 128, 16, 16, "output_throughput"),
    "decode-32k-c64": (32768, 128, 64, 64, "output_throughput"),
}
WARMUP = (8192, 32, 8, 8, "output_throughput")  # compiles what the rows run, costs little
SERVE_ARGS = ["--load-format", "dummy", "--max-model-len", "140000", "--gpu-memory-utilization", "0.92"]
SERVED = "kimi-linear-48b-dummy"


def impl_env(impl: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if impl == "intree":
        env["VLLM_PLUGINS"] = ""  # no general plugin: vLLM's own Kimi Linear serves
        # the in-tree model imports a CUTLASS-DSL GEMM at start-up unless these are off
        env.setdefault("VLLM_KIMI_K3_GEMM_AR", "0")
        env.setdefault("VLLM_ENABLE_GEMM_RS", "0")
    else:
        env["VLLM_PLUGINS"] = "kimi_linear"
    return env


def bench(base: str, model_dir: Path, row: str, out: Path, impl: str, env: dict, scale: float = 1.0) -> dict:
    inp, outp, n, conc, _ = ROWS.get(row, WARMUP)
    inp = max(16, int(inp * scale))
    name = f"{impl}-{row}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
           "--base-url", base, "--model", SERVED, "--tokenizer", str(model_dir),
           "--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(outp),
           "--random-range-ratio", "0", "--num-prompts", str(n), "--max-concurrency", str(conc),
           "--ignore-eos", "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--save-result", "--result-dir", str(out), "--result-filename", name]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (out / f"{impl}-{row}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed for {impl} {row}: {r.stderr[-2000:]}")
    res = json.loads((out / name).read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    res["input_throughput"] = res["total_input_tokens"] / res["duration"]  # prompt tokens/s
    return res


def run(impl: str, out: Path, rows: list[str], model_dir: Path | None = None, scale: float = 1.0,
        serve_args: list[str] = SERVE_ARGS) -> None:
    """`model_dir`/`scale`/`serve_args` other than the defaults: plumbing checks on a CPU only."""
    import requests

    from vllm_kimi_linear.tools.builder import build_published_config
    from vllm_kimi_linear.tools.harness import free_port, running_process

    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or build_published_config(out / "published-config")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = impl_env(impl)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), "--served-model-name",
           SERVED, "--host", "127.0.0.1", "--port", str(port), *serve_args]
    t0 = time.time()
    summary = {"impl": impl, "serve_args": serve_args, "scale": scale, "rows": {}}
    with running_process(cmd, env, out / f"server-{impl}.log", timeout=540,
                         ready=lambda: requests.get(base + "/v1/models", timeout=2).status_code == 200):
        summary["startup_s"] = round(time.time() - t0, 1)
        print(f"{impl}: ready after {summary['startup_s']} s", flush=True)
        warm = bench(base, model_dir, "warmup", out, impl, env, scale)
        summary["warmup_wall_s"] = warm["wall_s"]
        for row in rows:
            res = bench(base, model_dir, row, out, impl, env, scale)
            keep = ("input_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "completed", "total_input_tokens",
                    "duration", "wall_s")
            summary["rows"][row] = {k: res.get(k) for k in keep}
            print(impl, row, summary["rows"][row], flush=True)
            (out / f"summary-{impl}.json").write_text(json.dumps(summary, indent=1))


def report(out: Path) -> str:
    p, t = (json.loads((out / f"summary-{i}.json").read_text()) for i in ("plugin", "intree"))
    lines = ["| row | figure | plugin | in-tree | plugin / in-tree | TPOT ms (plugin / in-tree) |",
             "|---|---|---|---|---|---|"]
    ratios = {}
    for row, (*_, figure) in ROWS.items():
        if row not in p["rows"] or row not in t["rows"]:
            continue
        a, b = p["rows"][row][figure], t["rows"][row][figure]
        ratios[row] = round(a / b, 3)
        tpot = (f"{p['rows'][row]['median_tpot_ms']:.2f} / {t['rows'][row]['median_tpot_ms']:.2f}"
                if figure == "output_throughput" else "-")
        lines.append(f"| {row} | {figure} tok/s | {a:,.0f} | {b:,.0f} | **{ratios[row]:.2f}x** | {tpot} |")
    lines.append(f"\nstart-up: plugin {p.get('startup_s')} s, in-tree {t.get('startup_s')} s")
    (out / "ratios.json").write_text(json.dumps(ratios, indent=1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--impl", choices=("plugin", "intree"), required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    r.add_argument("--model-dir", type=Path, help="(plumbing checks) serve this checkpoint instead")
    r.add_argument("--scale", type=float, default=1.0, help="(plumbing checks) x prompt lengths")
    r.add_argument("--serve-args", default=None, help="(plumbing checks) replace the serve flags")
    rep = sub.add_parser("report")
    rep.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "report":
        print(report(a.out))
        return 0
    rows = [x for x in a.rows.split(",") if x]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {list(ROWS)}")
    run(a.impl, a.out, rows, a.model_dir, a.scale,
        a.serve_args.split() if a.serve_args is not None else SERVE_ARGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
