"""End to end through the README's serve command: `deploy/serve-cpu.sh` in a subprocess, talked to
with the `openai` package. One server for the module (start-up takes a minute or two on 2 cores)."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.server_process import free_port, running_server, server_env

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "kimi-linear-tiny"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours of the sea at dawn."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_kimi_linear.builder import build_tiny_checkpoint
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    port = free_port()
    env = server_env(KIMI_MODEL=str(model_dir), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1")
    base = f"http://127.0.0.1:{port}"
    cmd = [str(ROOT / "deploy" / "serve-cpu.sh"), "--served-model-name", SERVED_NAME, "--max-model-len", "2048"]
    with running_server(cmd, env, tmp_path_factory.mktemp("log") / "server.log",
                        ready=lambda: requests.get(f"{base}/v1/models", timeout=2).status_code == 200):
        yield base, model_dir


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tokenizer(server):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(server[1])


def test_models_route(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_chat_completion_matches_reference_and_counts_usage(client, tokenizer, server):
    from tests.reference import kimi_linear_ref as ref
    r = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    model = ref.load(server[1])
    expect = ref.greedy_generate(model, prompt_ids, 24, eos_token_id=tokenizer.eos_token_id)
    assert r.usage.completion_tokens == len(expect)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].message.content == tokenizer.decode(expect, skip_special_tokens=True)


def test_streamed_equals_unstreamed(client):
    kw = dict(model=SERVED_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    text, usage, chunks = "", None, 0
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            chunks += 1
        if chunk.usage:
            usage = chunk.usage
    assert chunks > 1
    assert text == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
