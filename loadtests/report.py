"""Writes a run's JSON and PNG plots, and prints its summary table."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def table(points: list[dict]) -> str:
    """One line per point: load, counts, throughput, latency percentiles, goodput, errors."""
    head = (f"{'point':<22} {'load':<26} {'ok/total':>9} {'req/s':>7} {'out tok/s':>10} "
            f"{'TTFT p50/p99 ms':>19} {'TPOT p50/p99 ms':>17} {'ITL p50 ms':>10} {'E2E p50/p99 s':>15} "
            f"{'goodput':>8}  errors")
    lines = [head, "-" * len(head)]
    for pt in points:
        s = pt["summary"]
        rq, th = s["requests"], s["throughput"]
        e2e = s["e2e_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "-"
        lines.append(
            f"{pt['name']:<22} {pt['arrival']['label']:<26} {rq['completed']:>4}/{rq['total']:<4} "
            f"{th['requests_per_s']:>7.2f} {th['output_tokens_per_s']:>10.1f} "
            f"{_fmt(s['ttft_ms']['p50']):>9}/{_fmt(s['ttft_ms']['p99']):<9} "
            f"{_fmt(s['tpot_ms']['p50']):>8}/{_fmt(s['tpot_ms']['p99']):<8} {_fmt(s['itl_ms']['p50'], 2):>10} "
            f"{_fmt(e2e['p50'] and e2e['p50'] / 1e3, 2):>7}/{_fmt(e2e['p99'] and e2e['p99'] / 1e3, 2):<7} "
            f"{s['goodput']['fraction']:>7.0%}  {errors}")
    return "\n".join(lines)


def write_json(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values, title, unit="ms"):
    xs = sorted(values)
    if xs:
        ax.plot([xs[0]] + xs, [0.0] + [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post",
                marker="." if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(unit)
    ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
    ax.grid(alpha=0.3)


def plot_point(point: dict, out: Path) -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, E2E), a request timeline and output tokens/s over time."""
    plt = _plt()
    recs = [r for r in point["requests"] if r["error"] is None]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _cdf(axes[0][0], [r["ttft"] * 1e3 for r in recs], "TTFT")
    _cdf(axes[0][1], [r["tpot"] * 1e3 for r in recs if r["tpot"] is not None], "TPOT")
    _cdf(axes[0][2], [x * 1e3 for r in recs for x in r["itl"]], "ITL (all gaps)")
    _cdf(axes[1][0], [r["e2e"] for r in recs], "end-to-end latency", unit="s")
    ax = axes[1][1]
    classes = sorted({r["cls"] for r in point["requests"]})
    colours = {c: f"C{i}" for i, c in enumerate(classes)}
    for k, r in enumerate(sorted(point["requests"], key=lambda r: r["start"])):
        if r["error"] is not None:
            ax.plot([r["start"]], [k], "rx")
            continue
        ax.plot([r["start"], r["start"] + r["ttft"]], [k, k], color=colours[r["cls"]], alpha=0.35, lw=2)
        ax.plot([r["start"] + r["ttft"], r["start"] + r["e2e"]], [k, k], color=colours[r["cls"]], lw=2)
    for c in classes:
        ax.plot([], [], color=colours[c], label=c)
    ax.legend(fontsize=8)
    ax.set_title("requests (faint: waiting + prefill, solid: decode)")
    ax.set_xlabel("s since start")
    ax.set_ylabel("request")
    ax = axes[1][2]
    times = sorted(t for r in recs for t in r["chunk_times"])
    if times:
        width = max(times[-1] / 50, 1e-3)
        bins = [0] * (int(times[-1] / width) + 1)
        for t in times:
            bins[int(t / width)] += 1
        ax.step([i * width for i in range(len(bins))], [b / width for b in bins], where="post")
    ax.set_title("output tokens/s over time")
    ax.set_xlabel("s since start")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{point['name']}: {point['arrival']['label']}")
    fig.tight_layout()
    path = out / f"{point['name']}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_sweep(points: list[dict], out: Path) -> Path:
    """Throughput and latency percentiles against the offered load of each point."""
    plt = _plt()
    xs = [p["arrival"]["concurrency"] if p["arrival"]["kind"] == "concurrency" else p["arrival"]["rate"]
          for p in points]
    xlabel = "concurrency" if points[0]["arrival"]["kind"] == "concurrency" else "offered rate (req/s)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    s = [p["summary"] for p in points]
    axes[0].plot(xs, [x["throughput"]["output_tokens_per_s"] for x in s], "o-", label="output tokens/s")
    axes[0].plot(xs, [x["throughput"]["total_tokens_per_s"] for x in s], "s--", label="total tokens/s")
    axes[0].set_ylabel("tokens/s")
    axes[0].legend()
    for ax, key, title in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "tpot_ms", "TPOT")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [x[key][q] if x[key][q] is not None else float("nan") for x in s], style, label=q)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
