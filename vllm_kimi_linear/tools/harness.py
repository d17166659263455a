"""Serving a checkpoint for the test suite and the load tests: the one harness both import.

Owns a server process's life (its own process group, a log file, a readiness poll with a
deadline, a clean stop of the API server, engine core and workers), the README's CPU serve
command on the builder's tiny model (`serve_tiny`), and what the tests and the soak read from a
running server: summed Prometheus samples, the in-use gauges that must be 0 once idle, and the
resident memory of its processes. Needs requests (and psutil for memory); no vLLM import.
`serve_tiny` and `cpu_server` run `deploy/serve-cpu.sh`, so they need a checkout of the project.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "deploy" / "serve-cpu.sh"
# must not leak into a server: the test suite's Triton interpreter switch, plugin and API-key picks
DROP = ("TRITON_INTERPRET", "VLLM_PLUGINS", "VLLM_API_KEY")
SERVED_NAME = "kimi-linear-tiny"
MAX_MODEL_LEN = 2048
# vLLM's own gauges, then the plugin's (present once the endpoint plugin is loaded)
VLLM_IN_USE = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
PLUGIN_IN_USE = ("kimi_linear_kda_slots_in_use", "kimi_linear_mla_blocks_in_use")


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


def _exit_on_sigterm() -> None:
    """`timeout`, and a device call's time limit, end a run with SIGTERM, whose default kills
    Python without running `finally`: a server started in its own process session would outlive
    the run and hold the GPU. So SIGTERM becomes SystemExit (in the main thread, where no one else
    handles it), and running_process stops its servers on the way out."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


@contextmanager
def running_process(cmd: list[str], env: dict, log_path: Path, ready: Callable[[], bool],
                    timeout: float = 900, poll: float = 2.0, keep: bool = False) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `ready()` (ServerStartError with the log's tail if the process exits
    or `timeout` passes), yield the process, then stop its whole process group (`keep`: leave it
    running when the block ends without an error, for a later process to use)."""
    _exit_on_sigterm()
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        log.flush()
        return Path(log_path).read_text()[-5000:]

    deadline = time.time() + timeout
    done = False
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
        done = True
    finally:
        if not (keep and done):
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


def answers(url: str) -> bool:
    """Whether `url` answers 200 now (raises while nothing listens: callers poll or catch)."""
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def impl_env(impl: str, **extra: str) -> dict:
    """`server_env` for a `vllm serve` of Kimi Linear by `impl`: "plugin" (this package: the
    model, the state route and gauges) or "intree" (no general plugin: vLLM's own class)."""
    env = server_env(**extra)
    if impl == "intree":
        env["VLLM_PLUGINS"] = ""
        # vLLM's in-tree Kimi Linear imports a CUTLASS-DSL GEMM at start-up unless these are off
        env.setdefault("VLLM_KIMI_K3_GEMM_AR", "0")
        env.setdefault("VLLM_ENABLE_GEMM_RS", "0")
    elif impl == "plugin":
        env["VLLM_PLUGINS"] = "kimi_linear"
    else:
        raise ValueError(f"the implementation must be 'plugin' or 'intree', got {impl!r}")
    return env


@contextmanager
def vllm_serve(model_dir: Path, served_name: str, args: list[str], env: dict, log_path: Path,
               timeout: float = 600, keep: bool = False) -> Iterator[str]:
    """`vllm serve model_dir` on a free local port (this Python's vLLM); yields the base URL
    (no /v1) once /v1/models answers; stopped afterwards unless `keep` (see running_process)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *args]
    with running_process(cmd, env, log_path, ready=lambda: answers(base + "/v1/models"), timeout=timeout,
                         keep=keep):
        yield base


def _serve_script() -> str:
    if not SERVE.is_file():
        raise ServerStartError(f"{SERVE} is missing: serving the tiny model needs a checkout of "
                               "vllm-kimi-linear (its deploy/serve-cpu.sh), not only the installed package")
    return str(SERVE)


@contextmanager
def cpu_server(model_dir: Path, name: str, args: list[str], log_path: Path, kv_cache_gib: int = 4,
               timeout: float = 900, cpu_bind: str | None = None) -> Iterator[str]:
    """Serve `model_dir` as `name`; yields the base URL (".../v1") once /v1/models answers."""
    port = free_port()
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    if cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    base = f"http://127.0.0.1:{port}/v1"
    with running_process([_serve_script(), "--served-model-name", name, *args], env, log_path,
                         ready=lambda: answers(base + "/models"), timeout=timeout):
        try:
            yield base
        except BaseException:  # a failed measurement: show what the server said
            print(f"--- tail of {log_path} ---\n{Path(log_path).read_text()[-4000:]}", file=sys.stderr)
            raise


@dataclass
class Server:
    base: str
    model_dir: Path
    pid: int
    log_path: Path
    api_key: str | None = None
    headers: dict = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base + path


@contextmanager
def serve_tiny(work_dir: Path, *extra_args: str, api_key: str | None = None,
               max_model_len: int = MAX_MODEL_LEN, extra_env: dict | None = None,
               timeout: float = 900, model_dir: Path | None = None) -> Iterator[Server]:
    """Run `deploy/serve-cpu.sh` on `model_dir` (default: the tiny checkpoint, built in
    `work_dir`), with `extra_env` added to its environment, until the block ends."""
    import requests

    from .builder import build_tiny_checkpoint

    work_dir = Path(work_dir)
    model_dir = model_dir or build_tiny_checkpoint(work_dir / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1",
                     **(extra_env or {}))
    cmd = [_serve_script(), "--served-model-name", SERVED_NAME,
           "--max-model-len", str(max_model_len), *extra_args]
    if api_key:
        cmd += ["--api-key", api_key]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    log_path = work_dir / "server.log"
    with running_process(cmd, env, log_path, timeout=timeout, ready=lambda: requests.get(
            f"{base}/v1/models", headers=headers, timeout=2).status_code == 200) as proc:
        yield Server(base, model_dir, proc.pid, log_path, api_key, headers)


# ---------------------------------------------------------------------------------- metrics

def scrape(base: str, headers: dict | None = None, timeout: float = 10) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over its label sets}."""
    import requests
    r = requests.get(base + "/metrics", headers=headers or {}, timeout=timeout)
    r.raise_for_status()
    return metric_sums(r.text)


def in_use(metrics: dict[str, float]) -> dict[str, float]:
    """The gauges that must read 0 once the server is idle: vLLM's KV-cache usage and request
    counts, and the plugin's KDA-slot / MLA-block gauges when /metrics has them."""
    return {k: metrics[k] for k in VLLM_IN_USE + PLUGIN_IN_USE if k in metrics}


def wait_idle(base: str, headers: dict | None = None, timeout: float = 60,
              poll: float = 0.5) -> dict[str, float]:
    """Poll /metrics until every in-use gauge is 0; return the last reading (zeros, or what was
    still held when `timeout` ran out, for the caller's assertion message)."""
    deadline = time.time() + timeout
    while True:
        got = in_use(scrape(base, headers))
        if got and all(v == 0 for v in got.values()):
            return got
        if time.time() > deadline:
            return got
        time.sleep(poll)


# ----------------------------------------------------------------------------------- memory

def server_processes(pid: int):
    """The server's processes: the API server `pid` and its descendants (engine core, worker),
    plus anything else left in its process group."""
    import psutil
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = {p.pid: p for p in [root] + root.children(recursive=True)}
    try:
        pgid = os.getpgid(pid)
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid not in procs and os.getpgid(p.pid) == pgid:
                    procs[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
    except ProcessLookupError:
        pass
    return list(procs.values())


def rss_bytes(pid: int) -> tuple[int, dict[int, int]]:
    """(total resident bytes, {pid: rss}) over the server's processes."""
    import psutil
    per = {}
    for p in server_processes(pid):
        try:
            per[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return sum(per.values()), per
