"""One KDA decode step as the layer runs it, ours against vLLM's in-tree kernels, in CUDA graphs.

    python kernels/benchmarks/decode_layer_bench.py --out DIR [--heads 32 4] [--batches 1 4 16 64 256]

Times (`triton.testing.do_bench_cudagraph`: replayed graphs, no Python launch cost, as in a FULL
decode graph) the two kernels of a KDA layer's decode step on the layer's own operands:
- conv update: a packed q|k|v row per request from the input GEMM (token stride wider than the
  row), its slot's conv state; ours `causal_conv1d_update` against vLLM's `causal_conv1d_update`;
- recurrence: q/k/v as views of the conv output, the raw gate `f`, beta logits as a column of the
  input GEMM's output, a state pool, the layer's output buffer; ours `fused_recurrent_kda_triton`
  at each (block_v, num_warps) of --configs against vLLM's `fused_recurrent_kda_packed_decode`
  (the kernel vLLM's own Kimi Linear runs; its pool is [slot, H, V, K], ours [slot, H, K, V]).
Before timing, each pair is checked on the same inputs (outputs and updated states, bf16
tolerance). Prints a table per head count; writes DIR/decode_layer_bench.json. Needs a GPU and
vLLM (for its kernels); without vLLM only ours is timed. `--cpu-check`: our side only, tiny
shapes, under TRITON_INTERPRET=1 (what CI can run of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kimi_kda from a checkout

D, W = 128, 4  # head dim, conv width (the published config)


def operands(B: int, H: int, dev, slots: int, seed: int = 0) -> dict:
    """The layer's decode operands for B requests (slots >= 1: vLLM's kernel skips slot 0)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    HD = H * D
    gemm_out = torch.randn(B, 3 * HD + H + 2 * D, generator=g).to(dev, torch.bfloat16)  # q|k|v, b, f_a, g_a
    return dict(
        gemm_out=gemm_out, qkv=gemm_out[:, :3 * HD], beta=gemm_out[:, 3 * HD:3 * HD + H],
        f=torch.randn(B, H, D, generator=g).to(dev, torch.bfloat16),
        conv_w=(torch.randn(3 * HD, W, generator=g) * 0.5).to(dev, torch.bfloat16),
        conv_pool=torch.randn(slots, 3 * HD, W - 1, generator=g).to(dev, torch.bfloat16),
        pool=(torch.randn(slots, H, D, D, generator=g) * 0.1).to(dev),
        A_log=torch.randn(H, generator=g).to(dev), dt_bias=torch.randn(HD, generator=g).to(dev),
        slots=(torch.randperm(slots - 1, generator=g)[:B] + 1).to(dev, torch.int32),
    )


def ours_conv(o):
    from kimi_kda.conv import causal_conv1d_update
    return lambda: causal_conv1d_update(o["qkv"], o["conv_w"], o["conv_pool"], o["slots"], backend="triton")


def ours_recurrent(o, conv_out, out, block_v=None, num_warps=None):
    from kimi_kda.kda.triton_recurrent import fused_recurrent_kda_triton
    B, H = o["f"].shape[:2]
    q, k, v = (t.reshape(B, 1, H, D) for t in conv_out.split(H * D, dim=-1))
    return lambda: fused_recurrent_kda_triton(
        q, k, v, o["f"].view(B, 1, H, D), o["beta"].reshape(B, 1, H), scale=D ** -0.5,
        initial_state=o["pool"], ssm_state_indices=o["slots"], use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, A_log=o["A_log"],
        dt_bias=o["dt_bias"], out=out.view(B, 1, H, D), block_v=block_v, num_warps=num_warps)


def vllm_kernels():
    try:
        from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_update
        from vllm.models.kimi_k3.nvidia.ops.third_party.kda import fused_recurrent_kda_packed_decode
    except Exception as e:  # no vLLM here, or one without these kernels
        print(f"vLLM's kernels not available ({type(e).__name__}: {e}): timing ours only")
        return None
    return causal_conv1d_update, fused_recurrent_kda_packed_decode


def vllm_conv(vk, o, out):
    """As vLLM's layer calls it: into a separate buffer (by default it writes over its input)."""
    return lambda: vk[0](o["qkv"], o["conv_pool"], o["conv_w"], None, activation="silu",
                         conv_state_indices=o["slots"], validate_data=False, out=out)


def vllm_recurrent(vk, o, conv_out, pool_vk, out):
    B, H = o["f"].shape[:2]
    return lambda: vk[1](conv_out, o["f"].view(1, B, H, D), o["beta"].reshape(1, B, H), o["A_log"],
                         o["dt_bias"], None, pool_vk, o["slots"], scale=D ** -0.5,
                         out=out.view(1, B, H, D))


def check(o, vk) -> dict:
    """Ours against vLLM's on fresh copies of the same operands: max |difference|."""
    B, H = o["f"].shape[:2]
    a, b = dict(o, conv_pool=o["conv_pool"].clone()), dict(o, conv_pool=o["conv_pool"].clone())
    ya, yb = ours_conv(a)(), torch.empty_like(o["qkv"])
    vllm_conv(vk, b, yb)()
    pa, pv = o["pool"].clone(), o["pool"].transpose(-1, -2).contiguous()
    oa, ob = (ya.new_empty(B, H, D) for _ in range(2))
    ours_recurrent(dict(o, pool=pa), ya, oa)()
    vllm_recurrent(vk, o, ya.contiguous(), pv, ob)()
    return {"conv_out": (ya.float() - yb.float()).abs().max().item(),
            "conv_state": (a["conv_pool"].float() - b["conv_pool"].float()).abs().max().item(),
            "out": (oa.float() - ob.float()).abs().max().item(),
            "state": (pa - pv.transpose(-1, -2)).abs().max().item()}


def run(heads, batches, configs, out_dir: Path) -> dict:
    import triton.testing
    vk = vllm_kernels()
    res = {"device": torch.cuda.get_device_name(), "configs": configs, "rows": []}
    for H in heads:
        print(f"\nH={H} (heads per GPU), K=V={D}: us per call, CUDA-graph replay")
        hdr = ["B", "conv ours", "conv vLLM"] + [f"rec {c}" for c in configs] + ["rec default", "rec vLLM", "check max|diff|"]
        print(" | ".join(hdr))
        for B in batches:
            o = operands(B, H, "cuda", slots=max(2 * B, 64) + 1, seed=B)
            conv_out = torch.empty(B, 3 * H * D, device="cuda", dtype=torch.bfloat16).copy_(o["qkv"])
            buf = torch.empty(B, H, D, device="cuda", dtype=torch.bfloat16)
            t = lambda fn: round(triton.testing.do_bench_cudagraph(fn) * 1e3, 2)  # noqa: E731
            row = {"H": H, "B": B, "conv_ours_us": t(ours_conv(o))}
            for c in configs:
                bv, nw = (int(x) for x in c.split("x"))
                row[f"rec_ours_{c}_us"] = t(ours_recurrent(o, conv_out, buf, bv, nw))
            row["rec_ours_default_us"] = t(ours_recurrent(o, conv_out, buf))
            if vk is not None:
                row["conv_vllm_us"] = t(vllm_conv(vk, o, torch.empty_like(conv_out)))
                pv = o["pool"].transpose(-1, -2).contiguous()
                row["rec_vllm_us"] = t(vllm_recurrent(vk, o, conv_out, pv, buf))
                row["check_max_abs_diff"] = check(operands(B, H, "cuda", max(2 * B, 64) + 1, seed=B), vk)
            res["rows"].append(row)
            print(" | ".join(str(x) for x in [B, row["conv_ours_us"], row.get("conv_vllm_us")]
                             + [row[f"rec_ours_{c}_us"] for c in configs]
                             + [row["rec_ours_default_us"], row.get("rec_vllm_us"), row.get("check_max_abs_diff")]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode_layer_bench.json").write_text(json.dumps(res, indent=1))
    return res


def cpu_check() -> None:
    """Our side of the script on the interpreter: the operands as the layer has them, and the
    recurrence at every block shape equal to the default's (block shapes split V, not K)."""
    o = operands(3, 2, "cpu", slots=8)
    conv_out = ours_conv(o)()
    outs = []
    for bv, nw in ((64, 2), (32, 4), (16, 1)):
        oo = dict(o, pool=o["pool"].clone())
        buf = torch.empty(3, 2, D, dtype=torch.bfloat16)
        ours_recurrent(oo, conv_out, buf, bv, nw)()
        outs.append((buf.float(), oo["pool"]))
    for b, p in outs[1:]:
        assert torch.allclose(b, outs[0][0], atol=1e-2) and torch.allclose(p, outs[0][1], atol=1e-5)
    print("cpu check: ok")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("decode-bench"))
    ap.add_argument("--heads", type=int, nargs="+", default=[32, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--configs", nargs="+", default=["64x2", "32x4", "32x2", "16x4", "64x4"],
                    help="our recurrence's block_v x num_warps")
    ap.add_argument("--cpu-check", action="store_true")
    a = ap.parse_args(argv)
    if a.cpu_check:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        cpu_check()
        return 0
    run(a.heads, a.batches, a.configs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
