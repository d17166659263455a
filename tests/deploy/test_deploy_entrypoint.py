"""The images' entrypoint (deploy/entrypoint.sh), run directly on this CPU machine with the CPU
image's own command line (Dockerfile.cpu CMD): it builds the embedded tiny Kimi Linear
(KIMI_TINY_MODEL_DIR -> python -m vllm_kimi_linear.tools.builder), starts `vllm serve`, its `ready` role
(the Kubernetes readiness probe) passes only with the API key, and a chat completion comes back
through the `openai` package. One server for the module; start-up takes a minute or two."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from deploy_helpers import DEPLOY, all_serve_arg_lists
from vllm_kimi_linear.tools.harness import free_port, running_process, server_env

openai = pytest.importorskip("openai")
ENTRYPOINT = DEPLOY / "entrypoint.sh"
API_KEY = "test-key-123"
START_TIMEOUT = 600  # seconds; server start is ~2 min on 2 cores


def _env(**extra) -> dict:
    env = server_env(**extra)
    # the venv's `vllm` and `python3` first, as they are on the image's PATH
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _cpu_image_args(model_dir: Path, port: int) -> list[str]:
    """The CPU image's CMD `vllm serve` arguments, pointed at our model directory and port."""
    args = list(all_serve_arg_lists()["docker/Dockerfile.cpu:CMD"])
    assert args[0] == "/models/kimi-linear-tiny"
    args[0] = str(model_dir)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    return args


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models") / "kimi-linear-tiny"
    port = free_port()
    env = _env(KIMI_TINY_MODEL_DIR=str(model_dir), VLLM_API_KEY=API_KEY, KIMI_PORT=str(port),
               VLLM_CPU_KVCACHE_SPACE="1")
    cmd = ["bash", str(ENTRYPOINT), "serve", *_cpu_image_args(model_dir, port)]

    def ready() -> bool:  # the Kubernetes readiness probe's own command
        return subprocess.run(["bash", str(ENTRYPOINT), "ready"], env=env, capture_output=True,
                              timeout=30).returncode == 0

    with running_process(cmd, env, tmp_path_factory.mktemp("log") / "entrypoint.log", ready,
                        timeout=START_TIMEOUT, poll=3.0):
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "model_dir": model_dir}


def test_entrypoint_built_the_tiny_model(server):
    assert (server["model_dir"] / "config.json").is_file()


def test_chat_completion(server):
    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, timeout=120)
    assert [m.id for m in client.models.list().data] == ["kimi-linear-tiny"]
    out = client.chat.completions.create(
        model="kimi-linear-tiny", max_tokens=8, temperature=0.0,
        messages=[{"role": "user", "content": "Name three colours of the sea at dawn."}])
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= out.usage.completion_tokens <= 8


def test_api_key_is_enforced(server):
    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    # liveness / startup probes hit /health, which needs no key
    assert requests.get(f"{server['base']}/health", timeout=10).status_code == 200


def test_ready_role_fails_without_the_key(server):
    out = subprocess.run(["bash", str(ENTRYPOINT), "ready"], env=_env(KIMI_PORT=str(server["port"])),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "401" in out.stderr


# --- roles that need no server ---------------------------------------------------------------

def test_ready_role_fails_when_nothing_listens():
    out = subprocess.run(["bash", str(ENTRYPOINT), "ready"], env=_env(KIMI_PORT=str(free_port())),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not ready" in out.stderr


@pytest.mark.parametrize("role,missing", [("leader", "LWS_GROUP_SIZE"), ("worker", "LWS_LEADER_ADDRESS")])
def test_multinode_roles_need_the_lws_environment(role, missing):
    env = {k: v for k, v in _env().items() if not k.startswith("LWS_")}
    out = subprocess.run(["bash", str(ENTRYPOINT), role], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and missing in out.stderr


def test_unknown_role_is_refused():
    out = subprocess.run(["bash", str(ENTRYPOINT), "sreve"], env=_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 64 and "unknown role" in out.stderr


def test_entrypoint_is_valid_bash_and_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True, timeout=30)
