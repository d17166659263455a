"""Bad checkpoints through the README's serve command (issue #5): `deploy/serve-cpu.sh` on a broken
copy of the tiny model exits before serving, with ONE error that names the tensor or field.

tests/test_config_errors.py already covers the checks themselves (every config field rule, a
missing tensor and a wrong shape) and engine start-up through `LLM(...)`. Added here: the served
path (`vllm serve`: non-zero exit, never healthy, the error once and last), a config that
disagrees with its weights (intermediate_size; num_experts), and a tensor of the wrong dtype.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from vllm_kimi_linear.tools.harness import ROOT, free_port, server_env

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _broken(tiny: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(tiny, dst)
    if tensors:
        w = load_file(str(dst / "model.safetensors"))
        tensors(w)
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c, indent=2))
    return dst


def serve_until_exit(model_dir: Path, log_path: Path, timeout: float = 420) -> tuple[int | None, str]:
    """Run deploy/serve-cpu.sh on model_dir. Returns (exit code, output) once it exits, or
    (None, output) as soon as it serves (/health 200): then it is stopped."""
    port = free_port()
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(ROOT / "deploy" / "serve-cpu.sh"), "--max-model-len", "512"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        rc = None
        try:
            while time.time() < deadline:
                rc = proc.poll()
                if rc is not None:
                    break
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            else:
                pytest.fail(f"serve neither exited nor served in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
    return rc, log_path.read_text()


def assert_one_clear_error(rc, out: str, message: str, prefix: str):
    assert rc is not None, f"the server started serving a broken checkpoint:\n{out[-3000:]}"
    assert rc != 0, out[-3000:]
    assert message in out, out[-4000:]
    assert out.count(prefix) == 1, f"{out.count(prefix)} errors, expected one:\n{out[-4000:]}"
    last = [ln for ln in out.splitlines() if ln.strip()][-4:]
    assert any(message in ln for ln in last), f"not the last error:\n{out[-3000:]}"


CASES = {
    "missing_tensor": (
        dict(tensors=lambda w: w.pop("model.layers.2.self_attn.dt_bias")),
        "Kimi Linear checkpoint: tensor model.layers.2.self_attn.dt_bias is missing; expected shape (256,)"),
    "config_intermediate_size_disagrees": (
        dict(config=lambda c: c.__setitem__("intermediate_size", 384)),
        "Kimi Linear checkpoint: tensor model.layers.0.mlp.down_proj.weight has shape (256, 512), but "
        "config.json implies (256, 384)"),
    "config_num_experts_disagrees": (
        dict(config=lambda c: c.__setitem__("num_experts", 16)),
        "Kimi Linear checkpoint: tensor model.layers.1.block_sparse_moe.gate.e_score_correction_bias has "
        "shape (8,), but config.json implies (16,)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_serve_exits_with_one_error_naming_the_tensor(tiny, tmp_path, case):
    edits, message = CASES[case]
    d = _broken(tiny, tmp_path / case, **edits)
    rc, out = serve_until_exit(d, tmp_path / "serve.log")
    assert_one_clear_error(rc, out, message, "Kimi Linear checkpoint:")


def test_serve_rejects_a_tensor_of_the_wrong_dtype(tiny, tmp_path):
    name = "model.layers.1.self_attn.A_log"

    def to_int(w):
        w[name] = w[name].round().to(torch.int32)
    d = _broken(tiny, tmp_path / "dtype", tensors=to_int)
    rc, out = serve_until_exit(d, tmp_path / "serve.log")
    assert_one_clear_error(rc, out, f"Kimi Linear checkpoint: tensor {name} has dtype", "Kimi Linear checkpoint:")
