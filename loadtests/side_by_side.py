"""This plugin against vLLM's in-tree Kimi Linear on one GPU: the same server flags, the same rows.

    # on the GPU machine, once per implementation (the plugin's entry point installed for
    # `plugin` only; the script itself runs from a checkout either way):
    python -m loadtests.side_by_side run --impl plugin --out DIR
    python -m loadtests.side_by_side run --impl intree --out DIR
    python -m loadtests.side_by_side report DIR        # the ratio table (markdown) + DIR/ratios.json

Serves Kimi-Linear-48B-A3B's published config with `--load-format dummy` (the builder's
`--published-config`: dimensions exactly as published, random weights, no download) with vLLM's
defaults (CUDA graphs, async scheduling, chunked prefill, prefix caching), and measures each row
with vLLM's own `vllm bench serve` (run in this process; random prompts of an exact token count,
`--ignore-eos`): prefill throughput at 8K/32K/128K prompts (one request at a time, 1 output
token), decode at a 32K context with 1, 16 and 64 concurrent requests (output tokens/s and the
server's TPOT), one request of 1,000,000 prompt tokens and 1 output token (TTFT), then the same
prompt again from the prefix cache with 256 output tokens (the server's TPOT at a 1M context, and
the request's end-to-end time). Each row also records the server's own per-request timings
(SERVER_MEANS, server_tpot_ms), which no stream chunking moves. One warm-up round first, so no row pays
for kernel compilation; the prefix cache is reset before every row but the 1M decode one, and
each row draws its own prompts. Every `vllm bench serve` JSON is kept in DIR, and each row's
(input, output, prompts, concurrency) in the summary: `report` compares only equal ones.

`--profile ROWS` serves with vLLM's torch profiler configured (the same flags for both
implementations) and, after the measured rows, runs each of ROWS once more with the profiler
armed to record PROFILE_STEPS engine steps from that row's PROFILE_FROM_STEP-th (vLLM's
`/start_profile` delay_iterations and max_iterations: the engine starts and stops it at those
steps; nothing here times it): c1 gives pure decode steps at a 32K context, c64 steps that mix a
prefill chunk with the running requests' decodes. DIR/profile-IMPL-ROW.json sums the GPU kernels
per step by name and by kind (GEMM, MoE, attention, KDA/conv, norm, ...), to say where one
implementation's step spends more than the other's; the raw traces go to DIR/traces-ROW.
`--keep-server` leaves the server running after the rows (its URL in DIR/server-IMPL.url) and a
later `run` of the same implementation and DIR uses it instead of starting another (and leaves it
running: `side_by_side_on_device.sh` stops it at the end of its call unless told to keep it): on
a GPU machine whose calls are limited to minutes, a long row (the 1M one) can then go in its own
call without a second start-up.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

ROWS = {  # name: (input tokens, output tokens, prompts, concurrency, the row's figures)
    # prompt counts such that each row runs for seconds: with 8 prompts of 8K (1.4 s) vLLM's
    # in-tree model read 46,955 and 40,697 tokens/s on two H200 sessions of 2026-12-03
    "prefill-8k": (8192, 1, 32, 1, ("input_throughput",)),
    "prefill-32k": (32768, 1, 16, 1, ("input_throughput",)),
    "prefill-128k": (131072, 1, 4, 1, ("input_throughput",)),
    # 512 tokens each: the H200 streamed one request's 128 tokens in 11 chunks ~50 ms apart, which
    # moves a 128-token TPOT by ~0.4 ms of its ~4; over 511 tokens ~0.1 ms
    # decode: output tokens/s (the whole row, prefills included) and the server's TPOT (below)
    "decode-32k-c1": (32768, 512, 4, 1, ("output_throughput", "server_tpot_ms")),
    "decode-32k-c16": (32768, 128, 16, 16, ("output_throughput", "server_tpot_ms")),
    "decode-32k-c64": (32768, 128, 64, 64, ("output_throughput", "server_tpot_ms")),
    # one output token: TTFT is the whole request. With 256 tokens the first one reached the client
    # after the last (2026-12-03: 255 tokens 40 ms after the "first"), so TTFT timed decode too
    "1m": (1_000_000, 1, 1, 1, ("median_ttft_ms",)),
    # the same prompt again (SAME_PROMPTS), served from the prefix cache: decode at a 1M context
    "1m-decode": (1_000_000, 256, 1, 1, ("server_tpot_ms", "median_e2el_ms")),
}
# row: the row whose prompts it reuses, with the prefix cache kept (run it right after that row)
SAME_PROMPTS = {"1m-decode": "1m"}
HIGHER_IS_BETTER = {"input_throughput": True, "output_throughput": True, "server_tpot_ms": False,
                    "median_tpot_ms": False, "median_ttft_ms": False, "median_e2el_ms": False}
# The server's own per-request timings (vLLM's histograms, from the engine's step timestamps),
# summed over a row's requests: the client's TTFT and TPOT time stream chunks, and a busy API
# server merges a request's tokens into few (H200, 2026-12-03: 256 tokens at a 1M context in 3
# chunks, the first after 11.3 s for the plugin and 3.2 s for the in-tree model, 128 tokens at
# c64 in 6 and 18), so a client TPOT can move either way by which tokens shared a chunk.
SERVER_MEANS = {"server_ttft_ms": "vllm:time_to_first_token_seconds",
                "server_queue_ms": "vllm:request_queue_time_seconds",
                "server_prefill_ms": "vllm:request_prefill_time_seconds",
                "server_e2e_ms": "vllm:e2e_request_latency_seconds"}
WARMUP = (8192, 32, 8, 8, ("median_tpot_ms",))  # compiles what the rows run, costs little
# 1,048,576 (the published context) holds the 1M row; the other rows are the same at any length
# --jit-monitor-verbose: a compile after warm-up is logged with its constants, so a first-request
# compile (the plugin's tuned MoE tiles gave one, 2026-12-03) names the shape it was for
SERVE_ARGS = ["--load-format", "dummy", "--max-model-len", "1048576", "--gpu-memory-utilization", "0.92",
              "--jit-monitor-verbose"]
SERVED = "kimi-linear-48b-dummy"
PROFILE_STEPS = 32
# the engine step a profiled row's recording starts at (vLLM counts the steps from /start_profile).
# c1: the first 32K prompt is in by step 5 (chunks of 7,680 tokens), so pure decode; c64: its
# 2.1M prompt tokens take ~275 steps and the first prompts' 128 tokens run from ~step 6 to ~133,
# so steps 100-131 each carry a 7,680-token prefill chunk and the decodes of the ~23-30 prompts
# already in
PROFILE_FROM_STEP = {"decode-32k-c1": 8, "decode-32k-c64": 100}
KERNEL_KINDS = (  # (kind, name fragments): the first kind whose fragment a kernel's name has
    # fla's and vLLM's KDA kernels by their names; ours (kimi_kda) by their kernel names
    ("kda/conv", ("kda", "recurrent", "conv", "gated_delta", "chunk_", "_update_kernel", "_prefill_kernel",
                  "_cumsum_kernel", "_diag_kernel", "_solve_kernel", "_wu_kernel", "_state_kernel",
                  "_output_kernel")),
    ("moe", ("moe", "expert", "topk", "grouped")),
    ("attention", ("flash", "mla", "fmha", "attn")),
    ("gemm", ("gemm", "gemv", "sm90", "cutlass", "nvjet", "cublas", "matmul", "splitk")),
    ("norm", ("norm",)),
    ("copy/fill", ("copy", "fill", "cat", "index", "elementwise", "vectorized")),
)
KEEP = ("spec", "input_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
        "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "stream_chunks",
        "completed", "failed", "total_input_tokens", "duration", "wall_s", "server_requests",
        "server_tpot_ms", *SERVER_MEANS)


def row_seed(row: str) -> int:
    """Each row its own prompts, whichever call runs it; a SAME_PROMPTS row its source row's."""
    return list(ROWS).index(SAME_PROMPTS.get(row, row)) + 1


def vllm_bench_serve(argv: list[str], log: Path) -> None:
    """`vllm bench serve ARGV`, in this process: a process per row spent ~20 s importing vLLM
    (H200, 2026-12-03), and a device call has 600. What it prints goes to `log`."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    with open(log, "w") as fh, redirect_stdout(fh), redirect_stderr(fh):
        main(args)


def bench(base: str, model_dir: Path, row: str, out: Path, impl: str, seed: int,
          scale: float = 1.0) -> dict:
    """One `vllm bench serve` row on a cold prefix cache: random prompts of one seed share their
    first tokens with the other rows' (vLLM's random dataset draws each prompt's start token
    first), so the cache is reset (a dev route) and each row draws from its own seed. A
    SAME_PROMPTS row keeps the cache: its prompts are its source row's, already cached."""
    import requests

    from vllm_kimi_linear.tools.harness import scrape

    inp, outp, n, conc, _ = ROWS.get(row, WARMUP)
    inp = max(16, int(inp * scale))
    if row not in SAME_PROMPTS:
        requests.post(base + "/reset_prefix_cache", timeout=60).raise_for_status()
    before = scrape(base)
    name = f"{impl}-{row}.json"
    argv = ["--backend", "vllm", "--base-url", base, "--model", SERVED, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(outp),
            "--random-range-ratio", "0", "--num-prompts", str(n), "--max-concurrency", str(conc),
            "--ignore-eos", "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", name]
    log = out / f"{impl}-{row}.log"
    t0 = time.time()
    try:
        vllm_bench_serve(argv, log)
    except Exception as e:
        raise RuntimeError(f"vllm bench serve failed for {impl} {row} ({e!r}): see {log}") from e
    res = json.loads((out / name).read_text())
    if res.get("completed") != n:
        raise RuntimeError(f"{impl} {row}: {res.get('completed')} of {n} requests completed "
                           f"({res.get('failed')} failed): see {log}")
    res["wall_s"] = round(time.time() - t0, 1)
    res["input_throughput"] = res["total_input_tokens"] / res["duration"]  # prompt tokens/s
    # chunks the median request's output reached the client in: TPOT is a per-step figure only
    # when this is close to the output length
    chunks = sorted(len(itl) + 1 for itl in res.get("itls") or [])
    res["stream_chunks"] = chunks[len(chunks) // 2] if chunks else None
    res["spec"] = [inp, outp, n, conc]
    return res | server_timings(before, metrics_after(base, before, n))


def metrics_after(base: str, before: dict[str, float], n: int, timeout: float = 30) -> dict[str, float]:
    """/metrics once the server has counted the row's `n` requests finished (it records a
    request's timings as it sends the last chunk, so a reading right after may miss it)."""
    from vllm_kimi_linear.tools.harness import scrape

    deadline = time.time() + timeout
    while True:
        after = scrape(base)
        done = after.get(DONE, 0.0) - before.get(DONE, 0.0)
        if done >= n or time.time() > deadline:
            return after
        time.sleep(0.2)


DONE = "vllm:request_success_total"


def server_timings(before: dict[str, float], after: dict[str, float]) -> dict:
    """A row's requests as the server timed them, from /metrics read before and after it (so the
    warm-up's and earlier rows' requests drop out): the mean of each SERVER_MEANS per request, and
    server_tpot_ms, the requests' decode time (first token to last, engine step timestamps) over
    their decode steps (each output token but a request's first)."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    done = delta(DONE)
    out: dict = {"server_requests": int(done)}
    for key, metric in SERVER_MEANS.items():
        count = delta(metric + "_count")
        out[key] = round(1000 * delta(metric + "_sum") / count, 3) if count else None
    steps = delta("vllm:generation_tokens_total") - done
    decode_s = delta("vllm:request_decode_time_seconds_sum")
    out["server_tpot_ms"] = round(1000 * decode_s / steps, 4) if steps > 0 else None
    return out


def comparable(serve_args: list[str], scale: float) -> tuple[list[str], float]:
    """What decides what a row measures: the scale and every flag but the profiler's, which stays
    idle until the profiled reruns after the measured rows (so one side may be profiled, the
    other not). Two summaries compare when this is equal."""
    if "--profiler-config" in serve_args:  # `profiler_args`: the flag and its JSON
        i = serve_args.index("--profiler-config")
        serve_args = serve_args[:i] + serve_args[i + 2:]
    return serve_args, scale


def profiler_args(out: Path) -> list[str]:
    """vLLM's torch profiler, configured but idle until /start_profile; traces under DIR/profile."""
    cfg = {"profiler": "torch", "torch_profiler_dir": str((out / "profile").resolve()),
           "torch_profiler_with_stack": False, "ignore_frontend": True}
    return ["--profiler-config", json.dumps(cfg)]


@contextmanager
def _server(impl: str, model_dir: Path, serve_args: list[str], env: dict, out: Path, keep: bool):
    """(base URL, start-up seconds or None when an earlier run's kept server is used)."""
    from vllm_kimi_linear.tools.harness import answers, vllm_serve

    url = out / f"server-{impl}.url"
    if url.exists():
        base = url.read_text().strip()
        try:
            alive = answers(base + "/v1/models")
        except OSError:  # nothing listens there any more
            alive = False
        if alive:
            yield base, None
            return
        url.unlink()
    t0 = time.time()
    with vllm_serve(model_dir, SERVED, serve_args, env, out / f"server-{impl}.log", timeout=540,
                    keep=keep) as base:
        if keep:
            url.write_text(base)
        yield base, round(time.time() - t0, 1)


# vLLM's GPU model runner launches this once per step (after sampling): its count in a trace is
# the number of steps recorded
STEP_MARKER_KERNEL = "_post_update_kernel"


def kernel_table(trace_dir: Path, steps: int) -> dict:
    """The profiler's traces under `trace_dir` -> GPU kernel time by name and by KERNEL_KINDS,
    per step (CPU ops instead where the trace has no GPU kernels: a CPU plumbing check). The steps
    are counted in the trace (STEP_MARKER_KERNEL) where it has them, else taken as `steps`, the
    max_iterations asked of vLLM's profiler (which may record one step more, or, stopped late,
    many more)."""
    files = sorted(trace_dir.rglob("*.pt.trace.json*"))
    events = []
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            events += json.load(fh).get("traceEvents", [])
    cat = "kernel" if any(e.get("cat") == "kernel" for e in events) else "cpu_op"
    by_name: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == cat and "dur" in e:
            by_name.setdefault(e["name"], []).append(float(e["dur"]))
    rows = sorted(((sum(d), len(d), n) for n, d in by_name.items()), reverse=True)
    asked, steps = steps, len(by_name.get(STEP_MARKER_KERNEL, ())) or steps
    busy = gpu_busy([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                     if e.get("cat") == "kernel" and "ts" in e and "dur" in e])
    kinds: dict[str, float] = {}
    for total, _, name in rows:
        low = name.lower()
        kind = next((k for k, frags in KERNEL_KINDS if any(x in low for x in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + total / steps
    return {"category": cat, "steps": steps, "steps_asked": asked, "traces": len(files),
            "us_per_step": round(sum(r[0] for r in rows) / steps, 1),
            "launches_per_step": round(sum(r[1] for r in rows) / steps, 1),
            **({"gpu_span_us_per_step": round(busy[0] / steps, 1), "gpu_busy_fraction": round(busy[1], 3)}
               if busy else {}),
            "by_kind_us_per_step": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "us_per_step": round(t / steps, 2), "calls_per_step": round(c / steps, 2)}
                    for t, c, n in rows[:60]]}


def gpu_busy(intervals: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(first kernel start to last kernel end, the share of it some kernel runs): a step whose
    kernels leave the GPU idle much of the time is bound by the host, not by its kernels."""
    if not intervals:
        return None
    intervals.sort()
    covered, (lo, hi) = 0.0, intervals[0]
    for a, b in intervals[1:]:
        if a > hi:
            covered, lo = covered + hi - lo, a
        hi = max(hi, b)
    covered += hi - lo
    span = max(b for _, b in intervals) - intervals[0][0]
    return span, (covered / span if span else 1.0)


def profile_row(base: str, model_dir: Path, out: Path, impl: str, row: str, scale: float = 1.0) -> dict:
    """`row` run once more with vLLM's profiler armed for PROFILE_STEPS steps from step
    PROFILE_FROM_STEP[row] (default 1); its kernel table in DIR/profile-IMPL-ROW.json and the
    traces moved to DIR/traces-ROW. The rerun's own figures are kept beside the table, not in the
    summary's rows (the profiler slows the steps it records)."""
    import requests

    trace_dir, keep_dir = out / "profile", out / f"traces-{row}"
    for old in [*trace_dir.rglob("*.pt.trace.json*"), *keep_dir.glob("*")]:
        old.unlink()
    start = PROFILE_FROM_STEP.get(row, 1)
    r = requests.post(base + "/start_profile", json={"delay_iterations": start, "max_iterations": PROFILE_STEPS},
                      timeout=120)
    if not r.ok:  # a server started without --profiler-config (a kept one keeps its flags)
        raise SystemExit(f"{impl}: /start_profile answered {r.status_code} {r.text[:200]!r}: start the "
                         f"server with --profile (stop a kept server first)")
    try:
        rerun = bench(base, model_dir, row, out, f"{impl}-profiled", seed=row_seed(row), scale=scale)
    finally:  # the engine stopped it after PROFILE_STEPS steps unless the row had fewer: then here
        requests.post(base + "/stop_profile", timeout=600).raise_for_status()
    deadline = time.time() + 300  # the trace is written after the profiler stops
    while not list(trace_dir.rglob("*.pt.trace.json*")) and time.time() < deadline:
        time.sleep(2)
    time.sleep(5)
    table = kernel_table(trace_dir, PROFILE_STEPS)
    table |= {"row": row, "from_step": start, "rerun": {k: rerun.get(k) for k in KEEP}}
    if not table["launches_per_step"]:
        table["empty"] = (f"the trace holds no events: the row ran fewer than {start} steps, or the "
                          "profiler wrote nothing")
        print(f"{impl} {row} profile: {table['empty']}", flush=True)
    keep_dir.mkdir(exist_ok=True)
    for f in trace_dir.rglob("*.pt.trace.json*"):
        f.rename(keep_dir / f.name)
    (out / f"profile-{impl}-{row}.json").write_text(json.dumps(table, indent=1))
    return {k: table[k] for k in ("steps", "us_per_step", "launches_per_step", "gpu_span_us_per_step",
                                  "gpu_busy_fraction", "by_kind_us_per_step", "empty") if k in table}


def run(impl: str, out: Path, rows: list[str], model_dir: Path | None = None, scale: float = 1.0,
        serve_args: list[str] = SERVE_ARGS, keep: bool = False, profile: list[str] = ()) -> None:
    """`model_dir`/`scale`/`serve_args` other than the defaults: plumbing checks on a CPU only.
    Rows already in DIR/summary-IMPL.json are kept (a long list can be split over several runs)."""
    from vllm_kimi_linear.tools.builder import build_published_config
    from vllm_kimi_linear.tools.harness import impl_env, scrape

    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or build_published_config(out / "published-config")
    serve_args = list(serve_args) + (profiler_args(out) if profile else [])  # before a kept server starts
    env = impl_env(impl, VLLM_SERVER_DEV_MODE="1")  # the dev routes: /reset_prefix_cache
    path = out / f"summary-{impl}.json"
    summary = json.loads(path.read_text()) if path.exists() else {"impl": impl, "rows": {}}
    if summary.get("rows") and comparable(summary["serve_args"], summary["scale"]) != comparable(serve_args, scale):
        raise SystemExit(f"{path} holds rows served with other flags or scale: use another --out")
    summary |= {"serve_args": serve_args, "scale": scale}
    with _server(impl, model_dir, serve_args, env, out, keep) as (base, startup_s):
        # the plugin, and only the plugin, adds the kimi_linear_* gauges: which one really served
        if ("kimi_linear_kda_slots_in_use" in scrape(base)) != (impl == "plugin"):
            raise SystemExit(f"the server did not run the {impl} implementation (is the plugin "
                             f"{'not ' if impl == 'plugin' else ''}installed?): see {out}/server-{impl}.log")
        if startup_s is not None:  # a fresh server: warm it up (a kept one was warmed when started)
            summary["startup_s"] = startup_s
            print(f"{impl}: ready after {startup_s} s", flush=True)
            summary["warmup_wall_s"] = bench(base, model_dir, "warmup", out, impl, seed=0, scale=scale)["wall_s"]
        else:
            print(f"{impl}: using the server kept at {base}", flush=True)
        for row in rows:
            res = bench(base, model_dir, row, out, impl, seed=row_seed(row), scale=scale)
            summary["rows"][row] = {k: res.get(k) for k in KEEP}
            print(impl, row, summary["rows"][row], flush=True)
            path.write_text(json.dumps(summary, indent=1))
        for row in profile:
            summary.setdefault("profiles", {})[row] = profile_row(base, model_dir, out, impl, row, scale)
            print(impl, row, "profile", summary["profiles"][row], flush=True)
            path.write_text(json.dumps(summary, indent=1))


def figure_of(out: Path, summary: dict, row: str, figure: str) -> float | None:
    """A row's figure from the summary, or, for a row measured before the summary kept that
    figure, from the row's own `vllm bench serve` JSON in DIR (the server timings it cannot
    have: those are read from /metrics at the time)."""
    kept = summary["rows"].get(row)
    if kept is None:
        return None
    if figure in kept:
        return kept[figure]
    raw = out / f"{summary['impl']}-{row}.json"
    return json.loads(raw.read_text()).get(figure) if raw.exists() else None


def report(out: Path) -> str:
    """plugin / in-tree speed per row and figure (> 1: the plugin is faster): prompt tokens/s for
    prefill; for decode, output tokens/s (at 16 and 64 requests mostly the 32K prefills' time,
    which share the steps) and 1 / the server's TPOT; 1 / time for the 1M request."""
    p, t = (json.loads((out / f"summary-{i}.json").read_text()) for i in ("plugin", "intree"))
    if comparable(p["serve_args"], p["scale"]) != comparable(t["serve_args"], t["scale"]):
        raise SystemExit("the two summaries were served with other flags or scale: not comparable")
    lines = ["| row | figure | plugin | in-tree | plugin / in-tree speed |", "|---|---|---|---|---|"]
    ratios = {}
    for row, (*_, figures) in ROWS.items():
        for figure in figures:
            key = row if len(figures) == 1 else f"{row} {figure}"
            a, b = (figure_of(out, x, row, figure) for x in (p, t))
            if not a or not b:
                lines.append(f"| {row} | {figure} | {a} | {b} | not measured |")
                continue
            specs = [x["rows"][row].get("spec") for x in (p, t)]
            if None not in specs and specs[0] != specs[1]:  # one summary from before a row changed
                lines.append(f"| {row} | {figure} | {a:,.2f} | {b:,.2f} | not comparable: "
                             f"(input, output, prompts, concurrency) {specs[0]} vs {specs[1]} |")
                continue
            ratios[key] = round(a / b if HIGHER_IS_BETTER[figure] else b / a, 3)
            lines.append(f"| {row} | {figure} | {a:,.2f} | {b:,.2f} | **{ratios[key]:.2f}x** |")
    lines.append(f"\nstart-up: plugin {p.get('startup_s')} s, in-tree {t.get('startup_s')} s")
    for row in sorted(set(p.get("profiles", {})) & set(t.get("profiles", {}))):
        lines += ["", *profile_lines(row, p["profiles"][row], t["profiles"][row])]
    (out / "ratios.json").write_text(json.dumps(ratios, indent=1))
    return "\n".join(lines)


def profile_lines(row: str, a: dict, b: dict) -> list[str]:
    """Kernel time per profiled step by kind, plugin beside in-tree: where one step is longer."""
    ka, kb = a.get("by_kind_us_per_step", {}), b.get("by_kind_us_per_step", {})
    kinds = sorted(set(ka) | set(kb), key=lambda k: -max(ka.get(k, 0.0), kb.get(k, 0.0)))
    lines = [f"| {row}: profiled steps, kernel us a step | plugin | in-tree | plugin - in-tree |", "|---|---|---|---|"]
    for k in [*kinds, None]:
        x, y = (d.get(k, 0.0) for d in (ka, kb)) if k else (a.get("us_per_step", 0.0), b.get("us_per_step", 0.0))
        lines.append(f"| {k or 'all kernels'} | {x:,.1f} | {y:,.1f} | {x - y:+,.1f} |")
    return lines


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
    r.add_argument("--profile", default="", metavar="ROWS",
                   help=f"serve with vLLM's torch profiler and, after the rows, rerun each of these "
                        f"(comma list) recording {PROFILE_STEPS} of its steps")
    r.add_argument("--keep-server", action="store_true",
                   help="leave the server running for a later run of the same implementation and DIR")
    rep = sub.add_parser("report")
    rep.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "report":
        print(report(a.out))
        return 0
    rows = [x for x in a.rows.split(",") if x]
    profiled = [x for x in a.profile.split(",") if x]
    unknown = set(rows + profiled) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {list(ROWS)}")
    if set(profiled) & set(SAME_PROMPTS):
        ap.error(f"rows {sorted(set(profiled) & set(SAME_PROMPTS))} decode from a prompt another row "
                 "cached: a rerun after the rows would not find it; profile other rows")
    for row, source in SAME_PROMPTS.items():  # its source row leaves the prompt in the prefix cache
        if row in rows and (rows.index(row) == 0 or rows[rows.index(row) - 1] != source):
            ap.error(f"row {row} decodes from the prefix cache row {source} leaves: "
                     f"list it right after {source} (--rows ...,{source},{row})")
    run(a.impl, a.out, rows, a.model_dir, a.scale,
        a.serve_args.split() if a.serve_args is not None else SERVE_ARGS,
        keep=a.keep_server, profile=profiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
