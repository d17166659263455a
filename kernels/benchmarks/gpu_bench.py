"""KDA on a GPU: correctness and speed of our Triton kernels against fla-core's, and KDA vs MLA.

One run does everything (the GPU machine is lent by the minute):

    python kernels/benchmarks/gpu_bench.py --out DIR [--sections ceilings,check,tune,profile,prefill,decode,mla]

1. ceilings: device-to-device copy bandwidth and a bf16 8192^3 matmul on random data.
2. check:    our `chunk_kda` / `fused_recurrent_kda` (Triton) against fla-core's Triton kernels and
             a float64 reference (our PyTorch chunked path in float64, itself checked in CI against
             fla-core's naive references; fla's naive recurrence too at small T): bf16 inputs,
             fp32 states, T up to 64K, varlen batches, decode on a pool with scattered and padded
             slot indices, fp32 inputs.
3. tune:     block shapes of our chunk kernels at T=128K, one kernel's options at a time; the best
             combination becomes the default for the rest of the run (the chosen values are
             recorded in the JSON and copied into `triton_chunk.DEFAULTS` by hand).
   profile:  per-kernel CUDA time of one prefill at T=128K, ours and fla's; registers and spills.
   prefill:  median time (triton.testing.do_bench) at T in {4K, 32K, 128K, 1M}, H=32, K=V=128.
4. decode:   one token per request on a state pool, batch 1..256; achieved bandwidth counts the
             state read and written once.
5. mla:      MLA attention of the published dimensions (32 heads, latent 512 + rope 64, NoPE):
             prefill (kv_b_proj expansion + causal SDPA) and absorbed decode over a latent cache.
Needs torch, triton and fla-core; no vLLM. Prints tables; writes DIR/gpu_results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
import triton.testing

# Run as a script from a checkout (the GPU machine has no install of this package): the
# operators (kernels/) and the tests' float64 reference (repo root) are found beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from kimi_kda.kda import chunk_kda, fused_recurrent_kda
from kimi_kda.kda.cpu import chunk_kda_torch, fused_recurrent_kda_torch

RESULTS: dict = {}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(T, H, K=128, V=128, dtype=torch.bfloat16, N=1, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    q = r(1, T, H, K).to(dtype)
    k = torch.nn.functional.normalize(r(1, T, H, K), dim=-1).to(dtype)
    v = r(1, T, H, V).to(dtype)
    u = torch.rand(1, T, H, K, generator=gen, device=device)
    g = -30.0 * u ** 4          # mostly mild, sometimes down to -30 per step
    beta = torch.rand(1, T, H, generator=gen, device=device)
    h0 = r(N, H, K, V)
    return q, k, v, g, beta, h0


def bench(fn, rep_ms=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def once(fn):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.time()
            try:
                fn(*a, **kw)
            except Exception:  # keep going: one broken section must not cost the others
                RESULTS.setdefault("errors", {})[name] = traceback.format_exc()
                print(f"[{name}] FAILED\n{traceback.format_exc()}")
            print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
            torch.cuda.empty_cache()
        return run
    return wrap


@section("ceilings")
def ceilings():
    n = 1 << 30  # 4 GiB of fp32
    a = torch.empty(n, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * 4 / ms / 1e9   # GB/ms = TB/s
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = bench(lambda: x @ y)
    tflops = 2 * 8192 ** 3 / ms_mm / 1e9    # GFLOP/ms = TFLOP/s
    RESULTS["ceilings"] = {"copy_TBps": bw, "bf16_matmul_TFLOPs": tflops}
    print(f"copy {bw:.2f} TB/s (read+write), bf16 matmul {tflops:.0f} TFLOP/s")


@section("check")
def check():
    from fla.ops.kda import chunk_kda as fla_chunk
    from fla.ops.kda import fused_recurrent_kda as fla_rec
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_rec_fwd
    from tests.kernels.reference import naive_references
    naive_rec, _, _ = naive_references()
    rows = []

    def ref64(q, k, v, g, beta, h0, cu=None):
        return chunk_kda_torch(*(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double(),
                               output_final_state=True, cu_seqlens=cu)

    cases = [("bf16", T, 4, None) for T in (64, 1000, 4096, 16384, 65536)]
    cases += [("bf16-varlen", None, 4, [1, 63, 64, 65, 1000, 3000, 7, 1])]
    cases += [("fp32", 4096, 4, None), ("fp32-varlen", None, 3, [1, 2, 129, 700])]
    for kind, T, H, lens in cases:
        dtype = torch.float32 if kind.startswith("fp32") else torch.bfloat16
        cu = None
        if lens:
            T = sum(lens)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.long)
        N = len(lens) if lens else 1
        q, k, v, g, beta, h0 = inputs(T, H, dtype=dtype, N=N, seed=T)
        ro, rs = ref64(q, k, v, g, beta, h0, cu)
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        fo, fs = fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        ro2, rs2 = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu)
        row = {"case": kind, "T": T, "H": H, "lens": lens,
               "ours_chunk_o": rel(o, ro), "ours_chunk_state": rel(s, rs),
               "ours_recurrent_o": rel(ro2, ro), "ours_recurrent_state": rel(rs2, rs),
               "fla_chunk_o": rel(fo, ro), "fla_chunk_state": rel(fs, rs),
               "finite": bool(torch.isfinite(o).all() and torch.isfinite(s).all())}
        if T <= 1000 and cu is None:
            no, ns = naive_rec(*(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double(),
                               output_final_state=True)
            row["ref_vs_fla_naive64_o"] = rel(ro, no)
        rows.append(row)
        print({k_: (f"{v_:.2e}" if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)

    # decode on a pool: scattered slots, padded entries, untouched rows bit-identical
    H, K, V, B, slots = 32, 128, 128, 64, 300
    pool = torch.randn(slots, H, K, V, device="cuda")
    idx = torch.randperm(slots, device="cuda")[:B]
    idx[::7] = -1
    q, k, v, g, beta, _ = inputs(B, H, seed=1)
    q, k, v, g, beta = (x.transpose(0, 1) for x in (q, k, v, g, beta))   # [B, 1, ...]
    mine = pool.clone()
    o, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=mine, ssm_state_indices=idx)
    ref_pool = pool.double()
    ro, _ = fused_recurrent_kda_torch(*(x.double() for x in (q, k, v, g, beta)), initial_state=ref_pool,
                                      ssm_state_indices=idx)
    named = idx[idx >= 0]
    untouched = torch.ones(slots, dtype=torch.bool, device="cuda")
    untouched[named] = False
    pool_row = {"case": "decode-pool", "B": B, "padded": int((idx < 0).sum()),
                "o": rel(o[idx >= 0], ro[idx >= 0]), "named_slots": rel(mine[named], ref_pool[named]),
                "untouched_bit_identical": bool(torch.equal(mine[untouched], pool[untouched])),
                "padded_outputs_zero": bool((o[idx < 0] == 0).all())}
    live = idx >= 0
    fpool = pool.clone()
    fo, _ = fla_rec(q[live], k[live], v[live], g[live], beta[live], initial_state=fpool,
                    ssm_state_indices=idx[live], inplace_final_state=True)
    pool_row["fla_o_batch_layout"] = rel(fo, ro[live])
    fpool = pool.clone()
    nl = int(live.sum())
    cu = torch.arange(nl + 1, device="cuda", dtype=torch.int32)
    fo, _ = fla_rec_fwd(*(x[live].transpose(0, 1).contiguous() for x in (q, k, v, g, beta)), initial_state=fpool,
                        ssm_state_indices=idx[live].to(torch.int32), cu_seqlens=cu, inplace_final_state=True)
    pool_row["fla_fwd_o_varlen_layout"] = rel(fo[0], ro[live][:, 0])
    rows.append(pool_row)
    print(pool_row, flush=True)
    RESULTS["check"] = rows


@section("prefill")
def prefill(lengths, H):
    from fla.ops.kda import chunk_kda as fla_chunk
    rows = []
    for T in lengths:
        heads = H
        while True:
            try:
                q, k, v, g, beta, _ = inputs(T, heads)
                rep = 200 if T <= 131072 else 1000
                ours = bench(lambda: chunk_kda(q, k, v, g, beta), rep)
                fla = bench(lambda: fla_chunk(q, k, v, g, beta), rep)
                break
            except torch.OutOfMemoryError:
                q = k = v = g = beta = None
                torch.cuda.empty_cache()
                if heads <= 4:
                    raise
                heads //= 2
                print(f"T={T}: out of memory at H={heads * 2}, retrying at H={heads}", flush=True)
        # per-head chunk-form FLOPs from the report: 6 T D^2 + 3 T C D + T C^2
        flops = heads * (6 * T * 128 ** 2 + 3 * T * 64 * 128 + T * 64 ** 2)
        row = {"T": T, "H": heads, "ours_ms": ours, "fla_ms": fla, "ours_over_fla": ours / fla,
               "ours_TFLOPs": flops / ours / 1e9}
        rows.append(row)
        print(row, flush=True)
        del q, k, v, g, beta
        torch.cuda.empty_cache()
    RESULTS["prefill"] = rows


@section("decode")
def decode(batches, H):
    # fla's public wrapper refuses a state pool with cu_seqlens; vLLM calls the forward directly
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_rec
    from kimi_kda.kda.triton_recurrent import fused_recurrent_kda_triton
    K = V = 128
    slots = 512
    pool = torch.randn(slots, H, K, V, device="cuda")
    # pick our block shape at the largest batch, then use it for every batch
    Bmax = max(batches)
    idx = torch.randperm(slots, device="cuda")[:Bmax].to(torch.int32)
    x = [t.transpose(0, 1).contiguous() for t in inputs(Bmax, H, seed=7)[:5]]
    variants = {}
    for bv in (16, 32, 64, 128):
        for nw in (1, 2, 4, 8):
            try:
                variants[(bv, nw)] = bench(lambda: fused_recurrent_kda_triton(
                    *x, initial_state=pool, ssm_state_indices=idx, block_v=bv, num_warps=nw))
            except Exception as e:  # a shape the compiler refuses
                print(f"decode variant BV={bv} warps={nw}: {type(e).__name__}")
    best = min(variants, key=variants.get)
    RESULTS["decode_variants_B%d" % Bmax] = {f"BV={a},warps={b}": t * 1e3 for (a, b), t in variants.items()}
    print("decode variants (us):", RESULTS["decode_variants_B%d" % Bmax], "best", best, flush=True)
    rows = []
    for B in batches:
        idx = torch.randperm(slots, device="cuda")[:B].to(torch.int32)
        q, k, v, g, beta, _ = inputs(B, H, seed=B)
        xb = [t.transpose(0, 1).contiguous() for t in (q, k, v, g, beta)]   # [B, 1, ...]
        ours = bench(lambda: fused_recurrent_kda_triton(*xb, initial_state=pool, ssm_state_indices=idx,
                                                        block_v=best[0], num_warps=best[1]))
        ours_default = bench(lambda: fused_recurrent_kda(*xb, initial_state=pool, ssm_state_indices=idx))
        cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
        fla = bench(lambda: fla_rec(q, k, v, g, beta, initial_state=pool, ssm_state_indices=idx,
                                    cu_seqlens=cu, inplace_final_state=True))
        fla_out = fla_rec(q, k, v, g, beta, initial_state=pool.clone(), ssm_state_indices=idx, cu_seqlens=cu,
                          inplace_final_state=True)[0]
        ours_out = fused_recurrent_kda(*xb, initial_state=pool.clone(), ssm_state_indices=idx)[0]
        state_bytes = 2 * B * H * K * V * 4
        row = {"B": B, "H": H, "ours_us": ours * 1e3, "ours_default_us": ours_default * 1e3,
               "fla_us": fla * 1e3, "ours_vs_fla_o": rel(ours_out[:, 0], fla_out[0]), "ours_TBps": state_bytes / ours / 1e9, "fla_TBps": state_bytes / fla / 1e9}
        ceil = RESULTS.get("ceilings", {}).get("copy_TBps")
        if ceil:
            row["ours_frac_of_copy_bw"] = row["ours_TBps"] / ceil
            row["fla_frac_of_copy_bw"] = row["fla_TBps"] / ceil
        rows.append(row)
        print(row, flush=True)
    RESULTS["decode"] = rows


def kernel_report(fn):
    """Registers, spills and shared memory of every compiled version of a Triton kernel (through
    autotuner / heuristics wrappers; their chosen config too)."""
    best = None
    while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):
        best = best or getattr(fn, "best_config", None)
        fn = fn.fn
    out = []
    for caches in getattr(fn, "device_caches", {}).values():
        for ker in caches[0].values():
            try:
                ker._init_handles()
                out.append({"warps": ker.metadata.num_warps, "stages": ker.metadata.num_stages,
                            "regs": ker.n_regs, "spills": ker.n_spills, "shared": ker.metadata.shared})
            except Exception as e:  # noqa: BLE001
                out.append({"error": str(e)[:100]})
    return {"best_config": str(best), "compiled": out}


@section("profile")
def profile(T, H, cfgs=({},)):
    """Per-kernel CUDA time of one prefill, ours (each config) and fla's; registers and spills."""
    from fla.ops.kda import chunk_kda as fla_chunk
    from kimi_kda.kda import triton_chunk
    q, k, v, g, beta, _ = inputs(T, H)
    out = {}
    runs = [(f"ours {c}", lambda c=c: triton_chunk.chunk_kda_triton(q, k, v, g, beta, **c)) for c in cfgs]
    runs.append(("fla", lambda: fla_chunk(q, k, v, g, beta)))
    for name, fn in runs:
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        per = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            if t:
                per[e.key[:60]] = t / 1e3
        out[name] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
        print(name, {k_: round(v_, 3) for k_, v_ in out[name].items()}, flush=True)
    regs = {}
    for kname in ("_diag_kernel", "_solve_kernel", "_wu_kernel", "_state_kernel", "_output_kernel", "_cumsum_kernel"):
        regs[kname] = kernel_report(getattr(triton_chunk, kname))
    try:
        import fla.ops.kda.chunk_intra as fci
        import fla.ops.kda.chunk_intra_token_parallel as fct
        import fla.ops.kda.wy_fast as fwy
        regs["fla_inter_solve"] = kernel_report(fci.chunk_kda_fwd_kernel_inter_solve_fused)
        regs["fla_token_parallel"] = kernel_report(fct.chunk_kda_fwd_kernel_intra_token_parallel)
        regs["fla_recompute_w_u"] = kernel_report(fwy.recompute_w_u_fwd_kda_kernel)
    except Exception as e:  # noqa: BLE001
        regs["fla_error"] = str(e)[:200]
    for kname, r in regs.items():
        print(kname, r, flush=True)
    RESULTS["profile_ms"] = {"T": T, "H": H, **out}
    RESULTS["kernel_resources"] = regs


@section("tune")
def tune(T, H):
    """Block shapes of our chunk kernels at one length, one kernel's options at a time (whole-call
    time, output distance from fla's: a broken variant shows as a large distance); the best of
    each group are then combined, timed, and become the defaults for the rest of this run."""
    from fla.ops.kda import chunk_kda as fla_chunk
    from kimi_kda.kda import triton_chunk
    from kimi_kda.kda.triton_chunk import chunk_kda_triton
    q, k, v, g, beta, h0 = inputs(T, H)
    fo, fs = fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    groups = {
        "diag": [dict(diag_bh=a, diag_warps=b) for a, b in ((2, 1), (4, 1), (4, 2), (8, 2))],
        "solve": [dict(solve_bk=a, solve_warps=b) for a, b in ((16, 1), (16, 2), (32, 1))],
        "wu": [dict(wu_bk=a, wu_bv=b, wu_warps=c, wu_stages=d) for a, b, c, d in (
            (32, 128, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2), (128, 128, 8, 2))],
        "state": [dict(state_bv=32, state_stages=a) for a in (3, 4)],
    }
    def measure(cfg):
        try:
            o, s = chunk_kda_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True, **cfg)
            ms = bench(lambda: chunk_kda_triton(q, k, v, g, beta, **cfg), 100)
            row = {"cfg": cfg, "ms": ms, "o_vs_fla": rel(o, fo), "state_vs_fla": rel(s, fs)}
        except Exception as e:  # a shape the compiler refuses
            row = {"cfg": cfg, "ms": float("inf"), "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(row, flush=True)
        return row

    rows, best = [], {}
    for name, variants in groups.items():
        got = [measure(c) for c in variants]
        rows += got
        ok = [r for r in got if r["ms"] < float("inf") and r.get("o_vs_fla", 1) < 5e-3]
        if ok and name != "prec":
            best.update(min(ok, key=lambda r: r["ms"])["cfg"])
    combined = measure(best)
    if combined["ms"] < float("inf") and combined["o_vs_fla"] < 5e-3:
        triton_chunk.DEFAULTS.update(best)
    RESULTS["tune"] = {"T": T, "H": H, "fla_ms": bench(lambda: fla_chunk(q, k, v, g, beta), 100), "rows": rows,
                       "combined": combined, "defaults_now": dict(triton_chunk.DEFAULTS)}
    print("fla ms", RESULTS["tune"]["fla_ms"], "combined", combined, flush=True)


@section("mla")
def mla(lengths, H):
    """Published MLA dims: 32 heads, qk_nope 128, qk_rope 64, v 128, kv_lora_rank 512, NoPE."""
    nope, rope, vd, lat = 128, 64, 128, 512
    dt = torch.bfloat16
    w_kv_b = torch.randn(H * (nope + vd), lat, device="cuda", dtype=dt) / math.sqrt(lat)
    scale = (nope + rope) ** -0.5
    rows = []
    for T in lengths:
        q = torch.randn(1, H, T, nope + rope, device="cuda", dtype=dt)
        latent = torch.randn(T, lat, device="cuda", dtype=dt)
        k_rope = torch.randn(T, rope, device="cuda", dtype=dt)

        def mla_prefill():
            kv = (latent @ w_kv_b.t()).view(T, H, nope + vd)
            k = torch.cat([kv[..., :nope], k_rope[:, None, :].expand(T, H, rope)], -1).transpose(0, 1)
            v = kv[..., nope:].transpose(0, 1)
            return torch.nn.functional.scaled_dot_product_attention(q, k[None], v[None], is_causal=True,
                                                                    scale=scale)
        ms = bench(mla_prefill) if T <= 131072 else once(mla_prefill)
        kq, kk, kv_, kg, kb, _ = inputs(T, H)
        kda_ms = bench(lambda: chunk_kda(kq, kk, kv_, kg, kb)) if T <= 131072 else once(
            lambda: chunk_kda(kq, kk, kv_, kg, kb))
        del kq, kk, kv_, kg, kb, q, latent, k_rope
        torch.cuda.empty_cache()
        # decode, batch 1: absorbed MLA over a latent cache of T tokens vs one KDA recurrent step
        cache = torch.randn(1, T, lat + rope, device="cuda", dtype=dt)
        q_abs = torch.randn(1, H, lat + rope, device="cuda", dtype=dt)

        def mla_decode():
            p = torch.softmax((q_abs @ cache.transpose(1, 2)).float() * scale, -1).to(dt)
            return p @ cache[..., :lat]
        mla_dec = bench(mla_decode)
        pool = torch.randn(4, H, 128, 128, device="cuda")
        idx = torch.tensor([1], device="cuda", dtype=torch.int32)
        dq, dk, dv, dg, db, _ = inputs(1, H)
        dq, dk, dv, dg, db = (x.transpose(0, 1).contiguous() for x in (dq, dk, dv, dg, db))
        kda_dec = bench(lambda: fused_recurrent_kda(dq, dk, dv, dg, db, initial_state=pool, ssm_state_indices=idx))
        row = {"T": T, "H": H, "mla_prefill_ms": ms, "kda_prefill_ms": kda_ms, "prefill_mla_over_kda": ms / kda_ms,
               "mla_decode_us": mla_dec * 1e3, "kda_decode_us": kda_dec * 1e3, "decode_mla_over_kda": mla_dec / kda_dec}
        rows.append(row)
        print(row, flush=True)
        del cache
        torch.cuda.empty_cache()
    RESULTS["mla"] = rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="ceilings,check,profile,prefill,decode,mla")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072, 1048576])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--heads", type=int, default=32)
    args = ap.parse_args(argv)
    p = torch.cuda.get_device_properties(0)
    RESULTS["machine"] = {"gpu": p.name, "sms": p.multi_processor_count, "mem_GiB": p.total_memory / 2 ** 30,
                          "torch": torch.__version__, "triton": triton.__version__}
    print(RESULTS["machine"], flush=True)
    todo = args.sections.split(",")
    path = os.path.join(args.out, "gpu_results.json")
    for name, run in (("ceilings", lambda: ceilings()), ("check", lambda: check()),
                      ("tune", lambda: tune(131072, args.heads)),
                      ("prefill", lambda: prefill(args.lengths, args.heads)),
                      ("profile", lambda: profile(131072, args.heads)),
                      ("decode", lambda: decode(args.batches, args.heads)),
                      ("mla", lambda: mla(args.lengths, args.heads))):
        if name in todo:
            run()
            with open(path, "w") as f:
                json.dump(RESULTS, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
