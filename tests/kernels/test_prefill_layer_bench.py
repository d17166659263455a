"""The layer-call benchmark's plumbing (kernels/benchmarks/prefill_layer_bench.py), run as a
script at its tiny CPU shape: inputs, the three calls, the agreement check, the table, the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "benchmarks" / "prefill_layer_bench.py"


def test_cpu_dry_run(tmp_path):
    pytest.importorskip("fla", reason="requires fla-core")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "ours/fla" in run.stdout and "wrote" in run.stdout
    res = json.loads((tmp_path / "prefill_layer_bench.json").read_text())
    assert res["machine"]["device"].startswith("cpu")
    rows = res["rows"]
    assert [r["workload"] for r in rows] == ["40", "3 prompts"] and rows[1]["N"] == 3
    for r in rows:
        assert r["finite"]
        # bf16 outputs on both sides (the interpreter truncates to bf16: ~4e-3 here)
        assert r["max_rel_err_vs_fla"] < 2e-2 and r["unfused_vs_fla_o"] < 2e-2
        assert all(r[f"{c}_ms"] > 0 for c in ("ours", "fla", "unfused"))
