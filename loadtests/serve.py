"""Start and stop `deploy/serve-cpu.sh` for a benchmark script (the tests use tests/server_process.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "deploy" / "serve-cpu.sh"
# must not leak into a server: the test suite's Triton interpreter switch, plugin and API-key picks
DROP = ("TRITON_INTERPRET", "VLLM_PLUGINS", "VLLM_API_KEY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cpu_server(model_dir: Path, name: str, args: list[str], log_path: Path, kv_cache_gib: int = 4,
               timeout: float = 900, cpu_bind: str | None = None) -> Iterator[str]:
    """Serve `model_dir` as `name`; yields the base URL (".../v1") once /v1/models answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env.update(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    if cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    log = open(log_path, "w")
    proc = subprocess.Popen([str(SERVE), "--served-model-name", name, *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server for {name} exited with {proc.returncode}; log: {log_path}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server for {name} not ready after {timeout:.0f} s; log: {log_path}")
            time.sleep(2)
        yield base
    except BaseException:
        log.flush()
        print(f"--- tail of {log_path} ---\n{log_path.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
