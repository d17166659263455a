"""The KDA prefill exactly as the layer calls it: ours (fused), fla-core's (fused), and the old
unfused call, side by side on the shapes of issue 15.

    python kernels/benchmarks/prefill_layer_bench.py --out DIR [--quick] [--heads 4 8 32] [--profile]
    python kernels/benchmarks/prefill_layer_bench.py --out DIR --cpu-dry-run    # plumbing, no GPU

Inputs are the layer's raw tensors: q, k, v are views of one bf16 [T, 3*H*K] conv output (split
as the layer splits it, token stride 3*H*K), f the gate projection [1, T, H, K] bf16, b the beta
logits [1, T, H] bf16, A_log [H] and dt_bias [H*K] fp32, initial states [N, H, K, V] fp32; the
final states are returned. Columns (each one whole call, as the layer makes it):
  ours     kimi_kda chunk_kda(q, k, v, f, b, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
           use_qk_l2norm_in_kernel=True, A_log, dt_bias, cu_seqlens, chunk_layout (built ahead on
           the host, as vLLM's metadata builder does), initial_state, output_final_state=True)
  fla      fla.ops.kda.chunk_kda with the same keywords (cu_seqlens, no layout)
  unfused  kda_gate(f) -> sigmoid(b.float()) -> chunk_kda(q.float(), k.float(), v.float(), g, beta,
           use_qk_l2norm_in_kernel=True, ...): the layer's call before the fused path (its fp32
           q/k/v send our kernels down their exact-fp32 path)
  pregated kda_gate and sigmoid in torch, then our chunk_kda on the bf16 q, k, v (l2norm in it):
           what the gate and sigmoid cost outside the kernels, without the fp32 casts
Workloads: one 32K sequence, one 256K sequence, 48 prompts of mixed lengths totalling ~161K
tokens (fixed seed), one 1M sequence (H=4 only); H in {4, 8, 32}, K = V = 128. Before timing,
each shape checks that ours and fla agree (relative error of outputs and final states). Times
are triton.testing.do_bench medians. Prints a table; writes DIR/prefill_layer_bench.json.

--cpu-dry-run runs the same plumbing at a tiny shape on the CPU under TRITON_INTERPRET=1, with
fla's naive torch ops standing in for fla's chunk_kda (whose Triton kernels do not run in the
interpreter) and a wall-clock median instead of do_bench. Needs torch, triton and fla-core; no vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--cpu-dry-run" in sys.argv:  # read by triton at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

# Run as a script from a checkout: the operators (kernels/) are found beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from kimi_kda.kda import chunk_kda, kda_gate
from kimi_kda.kda.triton_chunk import device_chunk_layout

FUSED = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True)


def mixed_lengths(n=48, total=161_000, seed=48):
    """n prompt lengths, log-uniform between 64 and 16K before scaling to sum to ~total."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.empty(n).uniform_(4.16, 9.70, generator=gen))   # e^4.16 ~ 64, e^9.70 ~ 16K
    lens = (raw / raw.sum() * total).round().clamp_min(1).long()
    return lens.tolist()


def workloads(quick, dry):
    if dry:
        return [("40", [40]), ("3 prompts", [5, 40, 20])]
    if quick:
        return [("8K", [8192]), ("48 prompts ~20K", mixed_lengths(total=20_000))]
    return [("32K", [32768]), ("256K", [262144]), ("48 prompts ~161K", mixed_lengths()), ("1M", [1 << 20])]


def layer_inputs(lens, H, K, V, device, seed=0):
    """The layer's raw tensors for packed sequences `lens` (see the module doc), and the backend
    our calls take: the default (Triton on CUDA), or Triton in the interpreter on the CPU."""
    T, N = sum(lens), len(lens)
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    conv_out = r(T, 2 * H * K + H * V).to(torch.bfloat16)       # q | k | v, as the conv writes them
    q, k, v = conv_out.split([H * K, H * K, H * V], dim=-1)
    q, k, v = q.view(1, T, H, K), k.view(1, T, H, K), v.view(1, T, H, V)
    f = (2 * r(1, T, H, K)).to(torch.bfloat16)
    b = (2 * r(1, T, H)).to(torch.bfloat16)
    A_log = torch.empty(H, device=device).uniform_(1, 16, generator=gen).log()
    dt_bias = r(H * K) - 2
    h0 = r(N, H, K, V)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    layout = device_chunk_layout(1, T, cu, device)  # built ahead, as vLLM's metadata builder does
    # fla caches its chunk index per cu_seqlens tensor: one long copy, made once, as a caller would keep
    return dict(q=q, k=k, v=v, f=f, b=b, A_log=A_log, dt_bias=dt_bias, h0=h0, cu=cu, cu_long=cu.long(),
                layout=layout, backend="triton" if device == "cpu" else None)


def ours(x):
    return chunk_kda(x["q"], x["k"], x["v"], x["f"], x["b"], initial_state=x["h0"], output_final_state=True,
                     cu_seqlens=x["cu"], chunk_layout=x["layout"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                     backend=x["backend"], **FUSED)


def pregated(x, qkv_dtype=None):
    """The gate and sigmoid first, in torch; q/k/v cast to `qkv_dtype` (the layer's old call
    cast them to float32: `unfused`)."""
    g = kda_gate(x["f"], x["A_log"], x["dt_bias"])
    beta = torch.sigmoid(x["b"].float())
    q, k, v = (x[n] if qkv_dtype is None else x[n].to(qkv_dtype) for n in "qkv")
    return chunk_kda(q, k, v, g, beta, initial_state=x["h0"], output_final_state=True,
                     use_qk_l2norm_in_kernel=True, cu_seqlens=x["cu"], chunk_layout=x["layout"],
                     backend=x["backend"])


def unfused(x):
    return pregated(x, torch.float32)


def fla(x):
    from fla.ops.kda import chunk_kda as fla_chunk_kda
    return fla_chunk_kda(x["q"], x["k"], x["v"], x["f"], x["b"], initial_state=x["h0"], output_final_state=True,
                         cu_seqlens=x["cu_long"], A_log=x["A_log"], dt_bias=x["dt_bias"], **FUSED)


def fla_naive(x):
    """CPU stand-in for fla's chunk_kda: fla's own naive gate and recurrence, sequence by sequence."""
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_recurrent_kda
    l2 = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k = l2(x["q"].float()), l2(x["k"].float())
    g = naive_kda_gate(x["f"], x["A_log"], x["dt_bias"])
    beta = x["b"].float().sigmoid()
    cu = x["cu"].tolist()
    outs, states = [], []
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        o, st = naive_recurrent_kda(q[:, s:e], k[:, s:e], x["v"][:, s:e], g[:, s:e], beta[:, s:e],
                                    initial_state=x["h0"][i:i + 1], output_final_state=True)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1), torch.cat(states)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_ms(fn, dry, rep_ms):
    if dry:   # no CUDA events on the CPU, nothing to warm up in the interpreter: one wall-clock call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def kernel_times(fn):
    """CUDA time (ms) of each kernel one call launches, largest first (torch profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = {e.key[:50]: round(e.device_time_total / 1e3, 4) for e in prof.key_averages() if e.device_time_total}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def run_shape(name, lens, H, args, device):
    K = V = args.head_dim
    x = layer_inputs(lens, H, K, V, device)
    fla_fn = fla_naive if args.cpu_dry_run else fla
    fns = {"ours": ours, "fla": fla_fn, "unfused": unfused, "pregated": pregated}
    outs = {col: fn(x) for col, fn in fns.items()}
    row = {"workload": name, "H": H, "K": K, "V": V, "T": sum(lens), "N": len(lens)}
    if len(lens) > 1:
        row["lens"] = lens
    for col in ("ours", "unfused", "pregated"):
        row[f"{col}_vs_fla_o"] = rel(outs[col][0], outs["fla"][0])
        row[f"{col}_vs_fla_state"] = rel(outs[col][1], outs["fla"][1])
    row["max_rel_err_vs_fla"] = max(row["ours_vs_fla_o"], row["ours_vs_fla_state"])
    finite = all(bool(torch.isfinite(t).all()) for o in outs.values() for t in o)
    row["finite"] = finite
    del outs
    rep = 200 if row["T"] * H <= (1 << 20) else 1000
    for col, fn in fns.items():
        row[f"{col}_ms"] = time_ms(lambda: fn(x), args.cpu_dry_run, rep)
    for col in ("ours", "unfused", "pregated"):
        row[f"{col}_over_fla"] = row[f"{col}_ms"] / row["fla_ms"]
    if args.profile and not args.cpu_dry_run:
        row["kernels_ms"] = {col: kernel_times(lambda: fn(x)) for col, fn in fns.items()}
    return row


def print_table(rows):
    head = f"{'workload':<18} {'H':>3} {'tokens':>8} {'ours ms':>9} {'fla ms':>9} {'ours/fla':>9} " \
           f"{'unfused ms':>10} {'unf/fla':>8} {'pregated ms':>11} {'pre/fla':>8} {'max rel err':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<18} {r['H']:>3}  ERROR {r['error'][:80]}")
            continue
        print(f"{r['workload']:<18} {r['H']:>3} {r['T']:>8} {r['ours_ms']:>9.3f} {r['fla_ms']:>9.3f} "
              f"{r['ours_over_fla']:>9.2f} {r['unfused_ms']:>10.3f} {r['unfused_over_fla']:>8.2f} "
              f"{r['pregated_ms']:>11.3f} {r['pregated_over_fla']:>8.2f} {r['max_rel_err_vs_fla']:>11.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--heads", type=int, nargs="+", default=None, help="default 4 8 32 (2 for --cpu-dry-run)")
    ap.add_argument("--head-dim", type=int, default=None, help="K = V; default 128 (32 for --cpu-dry-run)")
    ap.add_argument("--quick", action="store_true", help="small shapes: 8K and 48 prompts of ~20K")
    ap.add_argument("--profile", action="store_true", help="also record each call's per-kernel CUDA times")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shape on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    args.heads = args.heads or ([2] if dry else [4, 8, 32])
    args.head_dim = args.head_dim or (32 if dry else 128)
    if not dry and not torch.cuda.is_available():
        sys.exit("no GPU: run with --cpu-dry-run for the plumbing check")
    device = "cpu" if dry else "cuda"
    machine = {"device": "cpu (TRITON_INTERPRET=1)" if dry else torch.cuda.get_device_name(0),
               "torch": torch.__version__, "triton": triton.__version__}
    try:
        import fla
        machine["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        sys.exit("fla-core is needed (pip install fla-core==0.6.0, or put it on PYTHONPATH)")
    print(machine, flush=True)
    results = {"machine": machine, "args": vars(args), "rows": []}
    path = Path(args.out) / "prefill_layer_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for H in args.heads:
        for name, lens in workloads(args.quick, dry):
            if name == "1M" and H != 4:
                continue   # the 1M shape is H=4 only
            try:
                row = run_shape(name, lens, H, args, device)
            except Exception as e:  # noqa: BLE001 - one failing shape must not cost the others
                if dry:
                    raise
                row = {"workload": name, "H": H, "error": f"{type(e).__name__}: {e}"}
            results["rows"].append(row)
            print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                   if k not in ("lens", "kernels_ms")}, flush=True)
            path.write_text(json.dumps(results, indent=2))
            if not dry:
                torch.cuda.empty_cache()
    print_table(results["rows"])
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
