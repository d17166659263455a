"""The decode benchmark's plumbing (kernels/benchmarks/decode_layer_bench.py), run as a script
under the Triton interpreter: the layer's decode operands (strided q/k/v, a beta column, a state
pool, the output buffer) through our conv update and recurrence, at every block shape it sweeps
(they split V only, so they must agree). Its comparison with vLLM's kernels needs a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "benchmarks" / "decode_layer_bench.py"


def test_cpu_check():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-check"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "cpu check: ok" in run.stdout
