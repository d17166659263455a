"""End to end through the README's serve command: `deploy/serve-cpu.sh` in a subprocess, talked to
with the `openai` package. One server for the module (start-up takes a minute or two on 2 cores)."""
from __future__ import annotations

import pytest
import requests

from tests.reliability_util import server_fixture
from vllm_kimi_linear.tools.harness import SERVED_NAME, scrape

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours of the sea at dawn."}]


server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused")


@pytest.fixture(scope="module")
def tokenizer(server):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(server.model_dir)


def test_models_route(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_chat_completion_matches_reference_and_counts_usage(client, tokenizer, server):
    from tests.reference import kimi_linear_ref as ref
    r = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    model = ref.load(server.model_dir)
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


def _gauges(base: str) -> dict[str, float]:
    return {k: v for k, v in scrape(base).items() if k.startswith("kimi_linear_")}


def test_state_route_and_metrics_follow_the_requests(client, server):
    base = server.base
    s = requests.get(f"{base}/kimi-linear/state", timeout=10).json()
    layout = s["layout"]
    assert layout["block_size"] == 128 and layout["kda_state_cache_mode"] == "align"
    assert layout["kda_slot_bytes"] > 0 and layout["mla_bytes_per_token"] == (512 + 64) * 4
    long_messages = [{"role": "user", "content": "tide pools and kelp " * 150}]
    # long enough to look while the request holds its state (no early end-of-sequence: the
    # gauges are read during its first chunks, the request then has hundreds of steps to go)
    stream = client.chat.completions.create(model=SERVED_NAME, messages=long_messages, max_tokens=600,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    # read while it streams: the first chunk can come before the scheduler has placed the request
    # (seen on a loaded CI machine), so look again after each of the next chunks
    during = {}
    for i, _ in enumerate(stream):
        if i < 20 and not during.get("kimi_linear_kda_slots_in_use"):
            during = _gauges(base)
    assert during["kimi_linear_kda_slots_in_use"] > 0 and during["kimi_linear_mla_blocks_in_use"] > 0
    # vLLM keeps a KDA checkpoint inside a prompt once the prompt is seen again (it pins the
    # junction then), so the third identical request is the first to hit
    for _ in range(2):
        client.chat.completions.create(model=SERVED_NAME, messages=long_messages, max_tokens=4,
                                       temperature=0)
    after = _gauges(base)
    assert after["kimi_linear_kda_slots_in_use"] == after["kimi_linear_mla_blocks_in_use"] == 0
    assert after["kimi_linear_blocks_free"] == after["kimi_linear_blocks_total"] - 1  # vLLM's null block
    assert after["kimi_linear_blocks_cached"] > 0 and after["kimi_linear_prefix_hit_rate"] > 0
    usage = requests.get(f"{base}/kimi-linear/state", timeout=10).json()["usage"]
    assert usage["prefix_hits"] > 0 and usage["prefix_hits"] % 128 == 0  # whole blocks
