"""Start and stop a server process: its own process group, a log file, a readiness poll with a
deadline, and a clean stop of the whole group (vLLM's API server, engine core and workers).
`cpu_server` runs `deploy/serve-cpu.sh` for the benchmark scripts; the test suite uses
`running_process` and `server_env` for every test that starts `vllm serve`."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "deploy" / "serve-cpu.sh"
# must not leak into a server: the test suite's Triton interpreter switch, plugin and API-key picks
DROP = ("TRITON_INTERPRET", "VLLM_PLUGINS", "VLLM_API_KEY")


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def metric_sums(prometheus_text: str) -> dict[str, float]:
    """A /metrics page -> {sample name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for name, _labels, value in _SAMPLE.findall(prometheus_text):
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    """This process's environment without DROP, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env.update(extra)
    return env


@contextmanager
def running_process(cmd: list[str], env: dict, log_path: Path, ready: Callable[[], bool],
                    timeout: float = 900, poll: float = 2.0) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `ready()` (ServerStartError with the log's tail if the process exits
    or `timeout` passes), yield the process, then stop its whole process group."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        log.flush()
        return Path(log_path).read_text()[-5000:]

    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"{cmd[0]} exited with {proc.returncode}; log {log_path}:\n{tail()}")
            try:
                if ready():
                    break
            except Exception:  # not listening yet
                pass
            if time.time() > deadline:
                raise ServerStartError(f"{cmd[0]} not ready after {timeout:.0f} s; log {log_path}:\n{tail()}")
            time.sleep(poll)
        yield proc
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group (also when the leader is gone: its engine core may not be),
    SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


@contextmanager
def cpu_server(model_dir: Path, name: str, args: list[str], log_path: Path, kv_cache_gib: int = 4,
               timeout: float = 900, cpu_bind: str | None = None) -> Iterator[str]:
    """Serve `model_dir` as `name`; yields the base URL (".../v1") once /v1/models answers."""
    port = free_port()
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    if cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    base = f"http://127.0.0.1:{port}/v1"
    with running_process([str(SERVE), "--served-model-name", name, *args], env, log_path,
                         ready=lambda: _answers(base + "/models"), timeout=timeout):
        try:
            yield base
        except BaseException:  # a failed measurement: show what the server said
            print(f"--- tail of {log_path} ---\n{Path(log_path).read_text()[-4000:]}", file=sys.stderr)
            raise
