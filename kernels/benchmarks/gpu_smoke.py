"""One chunk_kda call at a given shape against fla-core's, in its own process (for bisecting faults).

    CUDA_LAUNCH_BLOCKING=1 python kernels/benchmarks/gpu_smoke.py T H [state_bv] [stages]
"""
import sys

import torch

from gpu_bench import inputs, rel
from kimi_kda.kda.triton_chunk import chunk_kda_triton

if __name__ == "__main__":
    T, H = int(sys.argv[1]), int(sys.argv[2])
    bv = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    st = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    from fla.ops.kda import chunk_kda as fla_chunk
    q, k, v, g, beta, h0 = inputs(T, H)
    o, s = chunk_kda_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True, state_bv=bv, state_stages=st)
    fo, fs = fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.cuda.synchronize()
    print(f"T={T} H={H} bv={bv} stages={st}: ok, rel(o, fla)={rel(o, fo):.2e} rel(state, fla)={rel(s, fs):.2e}")
