"""The multi-node roles of deploy/entrypoint.sh on one machine: `leader` starts a Ray head and
waits for LWS_GROUP_SIZE nodes before it execs `vllm serve` with its arguments untouched; `worker`
joins the head at LWS_LEADER_ADDRESS. vLLM itself is replaced by a stub that records its arguments
(no GPUs here). Needs Ray (`ray` CLI and module next to this Python); skipped without it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy_helpers import DEPLOY

pytest.importorskip("ray")
ENTRYPOINT = DEPLOY / "entrypoint.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the role and the Ray daemons it started share its session
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(2)


def test_leader_waits_for_the_group_then_execs_vllm_serve(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    record = tmp_path / "vllm-args"
    (stub_dir / "vllm").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (stub_dir / "vllm").chmod(0o755)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "RAY_"))}
    env.update(PATH=f"{stub_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}", RAY_PORT=port,
               KIMI_RAY_TIMEOUT="120", LWS_GROUP_SIZE="2", LWS_LEADER_ADDRESS="127.0.0.1")
    args = ["some/model", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "2",
            "--distributed-executor-backend", "ray"]
    leader = subprocess.Popen(["bash", str(ENTRYPOINT), "leader", *args], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = None
    try:
        time.sleep(15)
        assert leader.poll() is None, "the leader must wait for the second node"
        assert not record.exists(), "vllm started before the group was complete"
        worker = subprocess.Popen(["bash", str(ENTRYPOINT), "worker"], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = leader.communicate(timeout=150)
        assert leader.returncode == 0, out[-3000:]
        assert "Ray cluster has 2 nodes" in out
        assert record.read_text().split("\n")[:-1] == ["serve", *args]
        assert worker.poll() is None, "the worker blocks for the life of the pod"
    finally:
        if worker is not None:
            _stop(worker)
        _stop(leader)
