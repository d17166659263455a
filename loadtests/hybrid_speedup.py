"""Decode speed-up of the hybrid (3 KDA : 1 MLA) over an all-MLA model of the same dimensions, on
this CPU, through vLLM's OpenAI server: `python -m loadtests.hybrid_speedup`.

Builds the tiny Kimi Linear and its all-MLA variant (`build_tiny_checkpoint(..., all_mla=True)`),
then serves them ONE AT A TIME, a fresh server per model and context length L (4K, 16K, 32K prompt
tokens), alternating which model goes first (4K: hybrid, all-MLA; 16K: all-MLA, hybrid; ...) so
that load from other processes on a shared machine hits both alike. Per server:

  1. request 0 (exactly L tokens) is sent alone: its TTFT is the prefill time;
  2. once its first token is out, the other B_max - 1 requests follow (same first L - 32 tokens, so
     with --prefix-caching they skip most of their prefill; decode still attends over all L);
  3. once all of them decode, a phase at each batch size, largest first, of at least --steps
     decode steps and --min-window-s seconds; a phase ends by cancelling requests (closing a
     stream aborts it in vLLM) down to the next batch size. Decode speed per phase from the
     streamed tokens' times (vLLM's continuous usage stats give exact token counts per chunk), see
     window_stats: a median, so a stall caused by another process does not count. As a check, the
     server's own count over the phase: vLLM's `vllm:generation_tokens_total` read from /metrics
     at both ends (a mean: stalls, and the time a /metrics read takes, count).

Writes loadtests/results/hybrid_speedup.{json,png,md} and prints the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .prompts import PromptBuilder, ServerTokenizer
from vllm_kimi_linear.tools.harness import cpu_server, metric_sums

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("kimi-linear", "all-mla")
SPAN = 8  # decode steps per TPOT sample
GENERATED = "vllm:generation_tokens_total"


def generation_tokens(metrics_text: str) -> float:
    """vLLM's generated-token counter from a /metrics page, summed over its label sets."""
    value = metric_sums(metrics_text).get(GENERATED)
    if value is None:
        raise RuntimeError(f"/metrics has no {GENERATED}: is this a vLLM server?")
    return value


class ServerCounter:
    """Reads vllm:generation_tokens_total; each read is stamped at the middle of its request."""

    def __init__(self, base: str):
        import httpx

        self.url = base.removesuffix("/v1") + "/metrics"
        self._http = httpx.AsyncClient(timeout=30)

    async def read(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = await self._http.get(self.url)
        r.raise_for_status()
        return generation_tokens(r.text), (t0 + time.perf_counter()) / 2

    async def aclose(self) -> None:
        await self._http.aclose()


def window_stats(reqs: list[dict], ta: float, tb: float) -> dict:
    """Decode speed of `reqs` (all decoding) between times ta and tb. TPOT = the median time per
    decode step, taken over spans of SPAN consecutive tokens of each request (spans even out chunks
    that reach the client in bursts; the median keeps a stall caused by another process on a shared
    machine from counting); tokens/s = len(reqs) / TPOT; also the plain mean, tokens / (tb - ta)."""
    tokens, steps = 0, []
    for r in reqs:
        inside = [(t, n) for t, n in r["chunks"] if ta <= t <= tb]
        if len(inside) < 2:
            continue
        tokens += inside[-1][1] - inside[0][1]
        k = min(SPAN, len(inside) - 1)
        steps += [(t2 - t1) / (n2 - n1) for (t1, n1), (t2, n2) in zip(inside, inside[k:]) if n2 > n1]
    if not steps:
        raise RuntimeError(f"no decode steps between {ta:.3f} and {tb:.3f} s")
    tpot = statistics.median(steps)
    return {"tokens_per_s": len(reqs) / tpot, "tpot_ms": 1e3 * tpot, "mean_tokens_per_s": tokens / (tb - ta),
            "window_s": tb - ta, "tokens": tokens}


async def _stream(client, model: str, messages: list[dict], max_tokens: int, rec: dict, started: asyncio.Event) -> None:
    """Stream one request into `rec`: (time, completion tokens so far) per chunk, from vLLM's
    continuous usage stats. Cancelling the task closes the stream, which aborts the request."""
    rec.update(sent=time.perf_counter(), first=None, chunks=[], prompt_tokens=None)
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    try:
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage:
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
            if chunk.usage and chunk.choices:
                if rec["first"] is None:
                    rec["first"] = now
                    started.set()
                rec["chunks"].append((now, chunk.usage.completion_tokens))
    finally:
        await stream.close()


async def _until_tokens(rec: dict, n: int, task: asyncio.Task) -> float:
    while not rec["chunks"] or rec["chunks"][-1][1] < n:
        if task.done():
            raise RuntimeError(f"a request ended early ({task.exception() or 'max_tokens reached'})")
        await asyncio.sleep(0.002)
    return rec["chunks"][-1][0]


async def measure_context(client, counter: ServerCounter, model: str, prompts, batches: list[int], steps: int,
                          max_tokens: int, min_window_s: float) -> dict:
    """Request 0 alone (prefill time), then the rest; once all decode, phases of at least `steps`
    steps and `min_window_s` seconds at each batch size from the largest down, ending each phase by
    cancelling requests."""
    n = max(batches)
    recs = [{} for _ in range(n)]
    events = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(_stream(client, model, prompts[0].messages, max_tokens, recs[0], events[0]))]
    try:
        await events[0].wait()
        tasks += [asyncio.create_task(_stream(client, model, p.messages, max_tokens, r, e))
                  for p, r, e in zip(prompts[1:n], recs[1:], events[1:])]
        for e, t in zip(events, tasks):
            await asyncio.wait([asyncio.create_task(e.wait()), t], return_when=asyncio.FIRST_COMPLETED)
            if t.done():
                raise RuntimeError(f"a request failed before its first token: {t.exception()}")
        if any(r["prompt_tokens"] != p.tokens for r, p in zip(recs, prompts)):
            raise RuntimeError("usage.prompt_tokens differs from the prompt's length")
        out = {}
        for b in sorted(batches, reverse=True):
            for t in tasks[b:]:
                t.cancel()
            await asyncio.gather(*tasks[b:], return_exceptions=True)
            lead = recs[0]["chunks"][-1][1]
            ta = await _until_tokens(recs[0], lead + 3, tasks[0])  # let the aborts settle
            g0, t0 = await counter.read()
            await _until_tokens(recs[0], lead + 3 + steps, tasks[0])
            while time.perf_counter() - t0 < min_window_s:
                if tasks[0].done():
                    raise RuntimeError("request 0 ended inside a window: raise --max-tokens")
                await asyncio.sleep(0.05)
            tb = recs[0]["chunks"][-1][0]
            g1, t1 = await counter.read()
            if g1 <= g0:
                raise RuntimeError(f"the server generated no tokens in {t1 - t0:.2f} s at batch {b}")
            out[b] = window_stats(recs[:b], ta, tb)
            out[b]["server"] = {"tokens_per_s": (g1 - g0) / (t1 - t0), "window_s": t1 - t0, "tokens": g1 - g0}
            tasks = tasks[:b]
        return {"prefill_s": recs[0]["first"] - recs[0]["sent"], "decode": out,
                # every request's (seconds since request 0 was sent, tokens so far), to re-analyse
                "timelines": [[(round(t - recs[0]["sent"], 5), k) for t, k in r["chunks"]] for r in recs]}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(base: str, model: str, contexts: list[int], batches: list[int], steps: int, max_tokens: int,
                  min_window_s: float, tag: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="unused", timeout=3600, max_retries=0)
    counter = ServerCounter(base)
    tok = ServerTokenizer(base, model)
    builder = PromptBuilder(tok, seed=0)
    out = {}
    try:
        await builder.setup()
        warm = await builder.build(256, 0, key="warm-up")
        # the server's first-use stalls (seconds) happen here, not inside a measurement
        await asyncio.gather(*[client.chat.completions.create(
            model=model, messages=warm.messages, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
            for _ in range(max(batches))])
        for L in contexts:
            # all but the last 32 tokens shared: with --prefix-caching only request 0 prefills in full
            prompts = [await builder.build(L, i, key=f"{tag}-{L}", prefix_tokens=L - 32) for i in range(max(batches))]
            t = time.perf_counter()
            out[L] = await measure_context(client, counter, model, prompts, batches, steps, max_tokens,
                                           min_window_s)
            out[L]["wall_s"] = time.perf_counter() - t
            print(f"  {model:<12} {L:>6} tokens: prefill {out[L]['prefill_s']:.2f} s; "
                  + ", ".join(f"B={b}: {w['tokens_per_s']:.1f} tok/s" for b, w in sorted(out[L]["decode"].items())),
                  flush=True)
    finally:
        await tok.aclose()
        await counter.aclose()
        await client.close()
    return out


def aggregate(rounds: list[dict], contexts: list[int], batches: list[int]) -> dict:
    """Per model, context and batch: the best (highest tokens/s, lowest prefill) of the rounds (load
    from other processes only ever slows a run down), with every round's value alongside.
    With one round that is simply the round's value."""
    agg = {}
    for m in MODELS:
        agg[m] = {}
        for L in contexts:
            runs = [r[m][L] for r in rounds if m in r]
            pre = [x["prefill_s"] for x in runs]
            dec = {}
            for b in batches:
                vals = [x["decode"][b]["tokens_per_s"] for x in runs if b in x["decode"]]
                server = [x["decode"][b]["server"]["tokens_per_s"] for x in runs if b in x["decode"]]
                if vals:
                    dec[b] = {"tokens_per_s": max(vals), "tpot_ms": 1e3 * b / max(vals),
                              "server_tokens_per_s": max(server), "rounds": vals}
            agg[m][L] = {"prefill_s": min(pre), "prefill_rounds": pre, "decode": dec}
    return agg


def markdown(agg: dict, contexts: list[int], batches: list[int]) -> str:
    h, a = MODELS
    lines = ["| context | batch | Kimi Linear tok/s | all-MLA tok/s | speed-up | TPOT ms (KL / MLA) | "
             "speed-up, server-counted means |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for L in contexts:
        for b in batches:
            x, y = agg[h][L]["decode"].get(b), agg[a][L]["decode"].get(b)
            if not (x and y):
                continue
            lines.append(f"| {L // 1024}K | {b} | {x['tokens_per_s']:.1f} | {y['tokens_per_s']:.1f} | "
                         f"**{x['tokens_per_s'] / y['tokens_per_s']:.2f}x** | "
                         f"{x['tpot_ms']:.1f} / {y['tpot_ms']:.1f} | "
                         f"{x['server_tokens_per_s'] / y['server_tokens_per_s']:.2f}x |")
    lines += ["", "| context | prefill s (Kimi Linear) | prefill s (all-MLA) | speed-up |", "|---:|---:|---:|---:|"]
    for L in contexts:
        p, q = agg[h][L]["prefill_s"], agg[a][L]["prefill_s"]
        lines.append(f"| {L // 1024}K | {p:.2f} | {q:.2f} | {q / p:.2f}x |")
    return "\n".join(lines)


def _ratio(agg: dict, L: int, b: int) -> float:
    x, y = (agg[m][L]["decode"].get(b) for m in MODELS)
    return x["tokens_per_s"] / y["tokens_per_s"] if x and y else float("nan")


def plot(agg: dict, contexts: list[int], batches: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ks = [L / 1024 for L in contexts]
    for i, b in enumerate(batches):
        for m, style in zip(MODELS, ("o-", "s--")):
            axes[0].plot(ks, [agg[m][L]["decode"].get(b, {}).get("tokens_per_s", float("nan")) for L in contexts],
                         style, color=f"C{i}", label=f"{m}, batch {b}")
        axes[1].plot(ks, [_ratio(agg, L, b) for L in contexts], "o-", color=f"C{i}", label=f"batch {b}")
    axes[1].axhline(3, color="grey", ls=":", label="3x goal")
    for m, style in zip(MODELS, ("o-", "s--")):
        axes[2].plot(ks, [agg[m][L]["prefill_s"] for L in contexts], style, color="k", label=m)
    titles = ("decode tokens/s", "decode speed-up, Kimi Linear / all-MLA", "prefill time of one request (s)")
    for ax, t in zip(axes, titles):
        ax.set_title(t)
        ax.set_xlabel("context (K tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [f"{k:g}K" for k in ks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle("tiny Kimi Linear (3 KDA : 1 MLA) vs all-MLA, same dimensions, vLLM on CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.hybrid_speedup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,16384,32768", help="prompt lengths (tokens)")
    p.add_argument("--batches", default="1,4,8", help="decode batch sizes")
    p.add_argument("--steps", type=int, default=32, help="decode steps per batch-size window, at least")
    p.add_argument("--min-window-s", type=float, default=2.0, help="seconds per batch-size window, at least")
    p.add_argument("--max-tokens", type=int, default=2048, help="max_tokens of every request: more than "
                   "it decodes while the others prefill plus all phases (requests are cancelled, not finished)")
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; the best round counts")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE for both servers")
    p.add_argument("--prefix-caching", action="store_true", help="keep vLLM's prefix caching on (both "
                   "servers): the follow-up requests of a context then skip most of their prefill")
    p.add_argument("--cpu-bind", help="VLLM_CPU_OMP_THREADS_BIND for both servers (e.g. '1' to keep "
                   "off core 0, where other vLLM servers bind by default); default: vLLM's automatic choice")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for hybrid_speedup.{json,png,md}")
    a = p.parse_args(argv)
    contexts = sorted(int(x) for x in a.contexts.split(","))
    batches = sorted({int(x) for x in a.batches.split(",")})
    if a.steps < 4 or a.rounds < 1 or min(batches) < 1 or min(contexts) < 256:
        p.error("need --steps >= 4, --rounds >= 1, batches >= 1 and contexts >= 256")
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint

    # a plain `kill` must still stop the server the run started (the `with` blocks below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    max_len = max(contexts) + a.max_tokens + 64
    a.out.mkdir(parents=True, exist_ok=True)
    serve_args = ["--max-model-len", str(max_len)] + ([] if a.prefix_caching else ["--no-enable-prefix-caching"])
    partial = a.out / "hybrid_speedup.partial.json"
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="hybrid-speedup-") as tmp:
        dirs = {MODELS[0]: build_tiny_checkpoint(Path(tmp) / MODELS[0]),
                MODELS[1]: build_tiny_checkpoint(Path(tmp) / MODELS[1], all_mla=True)}
        rounds = []
        for r in range(a.rounds):
            rounds.append({m: {} for m in MODELS})
            for i, L in enumerate(contexts):
                # alternate which model goes first, so drifting load on the machine hits both alike
                for m in (MODELS if (r * len(contexts) + i) % 2 == 0 else MODELS[::-1]):
                    t = time.time()
                    with cpu_server(dirs[m], m, serve_args, Path(tmp) / f"{m}-{r}-{L}.log",
                                    kv_cache_gib=a.kv_cache_gib, cpu_bind=a.cpu_bind) as base:
                        print(f"round {r + 1}/{a.rounds}, {L} tokens: {m} ready after {time.time() - t:.0f} s",
                              flush=True)
                        rounds[-1][m].update(asyncio.run(measure(base, m, [L], batches, a.steps, a.max_tokens,
                                                                 a.min_window_s, tag=f"r{r}")))
                    partial.write_text(json.dumps(rounds) + "\n")  # what a failed run leaves
    agg = aggregate(rounds, contexts, batches)
    table = markdown(agg, contexts, batches)
    cmd = "python -m loadtests.hybrid_speedup " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": cmd.strip(), "contexts": contexts, "batches": batches, "steps": a.steps,
              "min_window_s": a.min_window_s,
              "rounds": a.rounds, "prefix_caching": a.prefix_caching, "cpu_bind": a.cpu_bind,
              "max_tokens": a.max_tokens, "max_model_len": max_len, "kv_cache_gib": a.kv_cache_gib,
              "wall_s": time.time() - t_start, "aggregate": agg, "per_round": rounds,
              "when": time.strftime("%Y-%m-%d %H:%M")}
    (a.out / "hybrid_speedup.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "hybrid_speedup.md").write_text(f"`{result['command']}`\n\n{table}\n")
    plot(agg, contexts, batches, a.out / "hybrid_speedup.png")
    partial.unlink(missing_ok=True)
    print(f"\n{table}\n\nwrote {a.out}/hybrid_speedup.{{json,md,png}} ({result['wall_s'] / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
