"""`python -m loadtests`: run a named scenario (or a workload given by flags) against an
OpenAI-compatible server, print a table, write result.json and PNG plots."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import report
from .metrics import SLO, summarize
from .prompts import LocalTokenizer, PromptBuilder, ServerTokenizer
from .runner import plan, run
from .scenarios import SCENARIOS, Scenario, custom
from .workload import ARRIVALS, Arrival

RUNS = Path(__file__).resolve().parent / "results" / "runs"


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS), help="named scenario (--list); "
                   "without one, the workload comes from --input-tokens etc.")
    p.add_argument("--list", action="store_true", help="describe the scenarios and exit")
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="served model name (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY") or "EMPTY",
                   help="default: $OPENAI_API_KEY or $VLLM_API_KEY")
    g.add_argument("--tokenizer", help="count prompt tokens with this local tokenizer directory instead of "
                   "the server's POST /tokenize")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    g = p.add_argument_group("workload (override a scenario's, or define a custom one)")
    g.add_argument("--scale", type=float, default=1.0, help="multiply token lengths (0.008: 1M -> 8K)")
    g.add_argument("--num-requests", type=int, help="requests per point")
    g.add_argument("--max-duration", type=float, help="seconds per point after which no request is sent")
    g.add_argument("--arrival", choices=ARRIVALS)
    g.add_argument("--rate", type=float, help="requests/s (constant, poisson)")
    g.add_argument("--concurrency", type=int, help="closed-loop workers, or a cap on requests in flight for rates")
    g.add_argument("--sweep", type=_floats, help="comma-separated rates (or concurrencies): one point each")
    g.add_argument("--input-tokens", type=int, default=1024, help="custom: prompt tokens, chat template included")
    g.add_argument("--output-tokens", type=int, default=128, help="custom: completion tokens")
    g.add_argument("--prefix-tokens", type=int, default=0, help="custom: leading prompt tokens shared by all requests")
    g.add_argument("--seed", type=int)
    g.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: exactly "
                   "--output-tokens, through vLLM's ignore_eos)")
    g = p.add_argument_group("SLOs (goodput counts requests that meet all that are set)")
    g.add_argument("--slo-ttft-ms", type=float)
    g.add_argument("--slo-tpot-ms", type=float)
    g.add_argument("--slo-e2e-ms", type=float)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="directory for result.json and PNGs (default: "
                   "loadtests/results/runs/<scenario>-<time>)")
    g.add_argument("--no-progress", action="store_true")
    return p


def build_scenario(a: argparse.Namespace) -> Scenario:
    slo = None
    if a.slo_ttft_ms or a.slo_tpot_ms or a.slo_e2e_ms:
        slo = SLO(a.slo_ttft_ms, a.slo_tpot_ms, a.slo_e2e_ms)
    if a.scenario:
        return SCENARIOS[a.scenario].adjusted(a.scale, a.num_requests, a.max_duration, a.sweep, a.arrival,
                                              a.rate, a.concurrency, a.seed, slo)
    kind = a.arrival or ("concurrency" if a.rate is None else "poisson")
    arrival = Arrival(kind, None if kind == "concurrency" else a.rate,
                      a.concurrency or (1 if kind == "concurrency" else None), a.seed or 0)
    s = custom(a.input_tokens, a.output_tokens, a.prefix_tokens, arrival, a.num_requests or 16, a.max_duration)
    return s.adjusted(a.scale, sweep=a.sweep, seed=a.seed, slo=slo)


async def execute(s: Scenario, a: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=a.base_url, api_key=a.api_key, timeout=a.request_timeout, max_retries=0)
    tok = None
    try:
        models = (await client.models.list()).data
        model = a.model or models[0].id
        max_len = getattr({m.id: m for m in models}.get(model), "max_model_len", None)  # vLLM's field
        need = max(p.max_tokens_per_request for p in s.points)
        if max_len and need > max_len:
            raise SystemExit(f"error: scenario {s.name} needs {need:,} tokens per request (prompt + output) "
                             f"but {model} serves at most max_model_len={max_len:,}; use --scale")
        tok = LocalTokenizer(a.tokenizer) if a.tokenizer else ServerTokenizer(a.base_url, model, a.api_key)
        builder = PromptBuilder(tok, seed=a.seed or 0)
        await builder.setup()
        result = {"tool": "loadtests", "schema": 1, "scenario": s.name, "summary": s.summary,
                  "hardware": s.hardware, "serve": s.serve, "scale": a.scale, "base_url": a.base_url,
                  "model": model, "max_model_len": max_len, "tokenizer": a.tokenizer or "server POST /tokenize",
                  "argv": a.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slo": asdict(s.slo),
                  "points": []}
        for w in s.points:
            w = replace(w, ignore_eos=not a.no_ignore_eos)
            planned, classes = await plan(w, builder, not a.no_progress)
            records, duration = await run(client, model, w, planned, not a.no_progress)
            point = {"name": w.name, "arrival": {**asdict(w.arrival), "label": w.arrival.label},
                     "num_requests": w.num_requests, "max_duration_s": w.max_duration_s,
                     "ignore_eos": w.ignore_eos, "classes": classes,
                     "summary": summarize(records, duration, s.slo),
                     "requests": [r.to_json() for r in records]}
            result["points"].append(point)
            lines = report.table([point]).splitlines()
            print("\n".join(lines if len(result["points"]) == 1 else lines[-1:]), flush=True)
        return result
    finally:
        if tok is not None:
            await tok.aclose()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.list:
        for s in SCENARIOS.values():
            print(s.describe(), end="\n\n")
        print("Shrink for a CPU with --scale (0.008: 1M tokens -> 8,000) and --num-requests.")
        return 0
    try:
        s = build_scenario(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or RUNS / f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(s.describe(), flush=True)
    result = asyncio.run(execute(s, a))
    out.mkdir(parents=True, exist_ok=True)
    files = [report.plot_point(pt, out).name for pt in result["points"]]
    if len(result["points"]) > 1:
        files.append(report.plot_sweep(result["points"], out).name)
    result["files"] = files
    path = report.write_json(result, out)
    if len(result["points"]) > 1:
        print(f"\n{report.table(result['points'])}")
    print(f"\nwrote {path} and {', '.join(files)}")
    failed = sum(pt["summary"]["requests"]["failed"] for pt in result["points"])
    return 1 if failed else 0
