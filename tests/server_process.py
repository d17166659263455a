"""Runs a server command for a test module: its own process group, a log file, a readiness poll
with a deadline, and a clean stop of the whole group. Shared by every test that starts `vllm serve`
(through deploy/serve-cpu.sh or the images' entrypoint)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    """This process's environment without what must not leak into a server: the Triton
    interpreter switch the test conftest sets, and plugin or API-key selections."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_PLUGINS", "VLLM_API_KEY")}
    env.update(extra)
    return env


@contextmanager
def running_server(cmd: list[str], env: dict, log_path: Path, ready: Callable[[], bool],
                   timeout: float = 600, poll: float = 2.0) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `ready()` (failing the test with the log's tail if the process
    exits or `timeout` passes), yield the process, then stop its whole process group."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        log.flush()
        return log_path.read_text()[-5000:]

    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{tail()}")
            try:
                if ready():
                    break
            except Exception:  # not listening yet
                pass
            if time.time() > deadline:
                pytest.fail(f"{cmd[0]} not ready after {timeout:.0f} s:\n{tail()}")
            time.sleep(poll)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
