"""Our Triton kernels compile once per server, not again at the first batches of new sizes.

Triton compiles a kernel again for each class of its int arguments (== 1, a multiple of 16,
other) and pointer arguments (16-byte aligned or not). The token count, chunks per sequence and
the per-step index arrays (views into one buffer, so their alignment varies) change with every
batch: the kernels that take them must not specialise on them, so the compile of vLLM's profile
run serves every later prefill (on the H200, without this, the first real request recompiled all
eight prefill kernels: seconds of stall, vLLM's "JIT compilation during inference" warnings).
Checked on the kernels' declarations (Triton's JIT objects, built without the interpreter).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
PER_STEP = ("T", "NCS", "chunk_start", "chunk_end", "cu_seqlens", "seq_chunk_first", "cu",
            "seq_of_token", "slots", "has_init")
PROBE = f"""
import sys
sys.path.insert(0, {str(KERNELS)!r})
from triton.runtime.jit import JITFunction
from kimi_kda.kda import triton_chunk
from kimi_kda.conv import triton_conv
per_step = {PER_STEP!r}
for mod in (triton_chunk, triton_conv):
    for name, k in vars(mod).items():
        # (the decode conv is compiled per batch size in graph capture, its slots a view at 0)
        if isinstance(k, JITFunction) and name.endswith("_kernel") and name != "_update_kernel":
            missing = [a for a in per_step if a in k.arg_names and a not in k.do_not_specialize]
            print(mod.__name__, name, "specialises on", missing if missing else "nothing per step")
"""


def test_prefill_kernels_do_not_specialise_on_per_step_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    names = {line.split()[1] for line in lines}
    # every prefill kernel was looked at (the chunk pipeline and the conv)
    assert {"_cumsum_kernel", "_diag_kernel", "_solve_kernel", "_wu_kernel", "_state_kernel",
            "_output_kernel", "_prefill_kernel", "_save_state_kernel"} <= names, lines
    assert all(line.endswith("nothing per step") for line in lines), "\n".join(lines)
