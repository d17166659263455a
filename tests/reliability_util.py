"""Shared pieces of the reliability tests (tests/test_reliability_*.py) and tests/soak.py: one
server per test module through the README's serve command, Prometheus gauge reads, "idle and
nothing held" waits, and the resident memory of the server's processes.

Importable without vLLM; needs requests (and psutil for memory)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import requests

from loadtests.serve import metric_sums

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "kimi-linear-tiny"
MAX_MODEL_LEN = 2048
# vLLM's own gauges, then the plugin's (present once the endpoint plugin is loaded)
VLLM_IN_USE = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
PLUGIN_IN_USE = ("kimi_linear_kda_slots_in_use", "kimi_linear_mla_blocks_in_use")


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
def serve(tmp_path_factory, *extra_args: str, api_key: str | None = None,
          max_model_len: int = MAX_MODEL_LEN, extra_env: dict | None = None) -> Iterator[Server]:
    """Build the tiny checkpoint and run `deploy/serve-cpu.sh` on it (with `extra_env` added to
    its environment) until the block ends."""
    from loadtests.serve import free_port, running_process, server_env
    from vllm_kimi_linear.builder import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1",
                     **(extra_env or {}))
    cmd = [str(ROOT / "deploy" / "serve-cpu.sh"), "--served-model-name", SERVED_NAME,
           "--max-model-len", str(max_model_len)]
    if api_key:
        cmd += ["--api-key", api_key]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    log_path = tmp_path_factory.mktemp("log") / "server.log"
    with running_process(cmd, env, log_path, ready=lambda: requests.get(
            f"{base}/v1/models", headers=headers, timeout=2).status_code == 200) as proc:
        yield Server(base, model_dir, proc.pid, log_path, api_key, headers)


# ---------------------------------------------------------------------------------- metrics

def scrape(base: str, headers: dict | None = None, timeout: float = 10) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over its label sets}."""
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
    import os

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


# ---------------------------------------------------------------------------------- requests

def chat_body(content: str, max_tokens: int, **kw) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **kw}


def error_message(resp: requests.Response) -> str:
    """The human-readable message of an error response: OpenAI style {"error": {"message"}},
    FastAPI's {"detail"}, or the auth middleware's {"error": "..."}; '' if none."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or "")
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return ""
