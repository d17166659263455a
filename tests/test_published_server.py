"""A published-layout checkpoint served as a new user would: the README's serve command with the
plugin, no --trust-remote-code, `--tool-call-parser kimi_k2 --enable-auto-tool-choice`, talked
to with the `openai` package. One server for the module.

References no one here wrote: transformers' KimiLinearForCausalLM (tests/reference/hf_ref.py,
plain PyTorch, fla hidden, float64, kv_a_layernorm eps = rms_norm_eps as vLLM has it) for tokens
and log-probabilities, and the reference tokenizer (tests/reference/kimi_tokenizer_ref.py) for
ids. Served logprobs come from a float32 engine: TOL = 2e-4, tighter than the suite's 1e-3 for
engine tests (observed here: <= 1.5e-5 over 200 prompt positions and 12 greedy tokens).

The model is steered into a tool call by tests/forced_tokens.py (a logits processor that forces
given output ids); what is tested is the server's path from those tokens to OpenAI tool_calls.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from tests.reference import hf_ref
from tests.reference.kimi_tokenizer_ref import ReferenceTokenizer
from vllm_kimi_linear.tools.harness import SERVED_NAME, serve_tiny
from vllm_kimi_linear.tools.published import build_published_checkpoint

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-4
SYSTEM, USER = "You are terse.", "用中文和English说说 the weather?"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_ID, ARGS = "functions.get_weather:0", '{"city": "Paris"}'
TOOL_CALL_TEXT = ("<|tool_calls_section_begin|><|tool_call_begin|>" + CALL_ID + "<|tool_call_argument_begin|>"
                  + ARGS + "<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory) -> Path:
    return build_published_checkpoint(tmp_path_factory.mktemp("published") / "kimi-linear-published")


@pytest.fixture(scope="module")
def server(tmp_path_factory, published_dir):
    args = ("--tool-call-parser", "kimi_k2", "--enable-auto-tool-choice",
            "--logits-processors", "tests.forced_tokens:ForcedTokens")
    with serve_tiny(tmp_path_factory.mktemp("server"), *args, model_dir=published_dir,
                    extra_env={"PYTHONPATH": str(ROOT)}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused")


@pytest.fixture(scope="module")
def ref_tok(published_dir):
    return ReferenceTokenizer(published_dir)


@pytest.fixture(scope="module")
def hf_model(published_dir):
    cfg = json.loads((published_dir / "config.json").read_text())
    torch.set_num_threads(1)
    return hf_ref.load(published_dir, kv_a_layernorm_eps=cfg["rms_norm_eps"])


@pytest.fixture(scope="module")
def stop_ids(published_dir, ref_tok):
    gen = json.loads((published_dir / "generation_config.json").read_text())
    return {gen["eos_token_id"], ref_tok.specials["[EOS]"]}  # what vLLM stops on


def hf_greedy(model, ids: list[int], n: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (float64), with each chosen token's log-probability."""
    ids, out, lps = list(ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(hf_ref.logits(model, ids)[-1], -1)
        t = int(lp.argmax())
        out.append(t), lps.append(float(lp[t]))
        if t in stop:
            break
        ids.append(t)
    return out, lps


def chat_prompt(*turns: str) -> str:
    return "".join(turns) + "<|im_assistant|>assistant<|im_middle|>"


def test_tokenize_and_detokenize_routes(server, ref_tok):
    from tests.test_published_tokenizer import TEXTS
    for text in TEXTS:
        r = requests.post(server.url("/tokenize"), json={"model": SERVED_NAME, "prompt": text}, timeout=60)
        assert r.status_code == 200, r.text
        ids = r.json()["tokens"]
        assert ids == ref_tok.encode(text), text[:40]
        r = requests.post(server.url("/detokenize"), json={"model": SERVED_NAME, "tokens": ids}, timeout=60)
        assert r.status_code == 200 and r.json()["prompt"] == text, text[:40]


def test_chat_renders_the_published_format_and_matches_transformers(client, ref_tok, hf_model, stop_ids):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    r = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True)
    prompt = ref_tok.encode(chat_prompt(f"<|im_system|>system<|im_middle|>{SYSTEM}<|im_end|>",
                                        f"<|im_user|>user<|im_middle|>{USER}<|im_end|>"))
    assert r.usage.prompt_tokens == len(prompt)
    want, want_lp = hf_greedy(hf_model, prompt, 12, stop_ids)
    got_lp = [c.logprob for c in r.choices[0].logprobs.content]
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == ref_tok.tok.decode(want, skip_special_tokens=True)
    print(f"chat greedy logprobs vs transformers: max |diff| "
          f"{max(abs(a - b) for a, b in zip(got_lp, want_lp)):.2e} over {len(want)} tokens")
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < TOL


def test_prompt_logprobs_match_transformers(client, ref_tok, hf_model, stop_ids):
    """Per-position log-probabilities of a 200-token prompt (Chinese, CamelCase, code) and the
    greedy continuation, served (float32) against transformers (float64)."""
    from tests.test_published_tokenizer import TEXTS
    ids = ref_tok.encode("".join(TEXTS[:7] + TEXTS[-4:]))[:200]
    r = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=1,
                                  extra_body={"prompt_logprobs": 0, "ignore_eos": True})
    served = torch.tensor([e[str(t)]["logprob"] for e, t in zip(r.choices[0].prompt_logprobs[1:], ids[1:])],
                          dtype=torch.float64)
    err = (served - hf_ref.prompt_logprobs(hf_model, ids)).abs()
    print(f"prompt logprobs vs transformers: max |diff| {err.max().item():.2e} over {len(err)}")
    assert err.max().item() < TOL, f"max |diff| {err.max().item():.2e} at {int(err.argmax()) + 1}"
    want, want_lp = hf_greedy(hf_model, ids, 6, set())
    assert r.choices[0].text == ref_tok.tok.decode(want, skip_special_tokens=True)
    assert max(abs(a - b) for a, b in zip(r.choices[0].logprobs.token_logprobs, want_lp)) < TOL


def test_tool_call_becomes_openai_tool_calls(client, ref_tok):
    force = ref_tok.encode(TOOL_CALL_TEXT)
    kw = dict(model=SERVED_NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
              max_tokens=len(force) + 4, temperature=0, extra_body={"vllm_xargs": {"force_tokens": force}})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert r.usage.completion_tokens == len(force)  # stopped at <|im_end|>, the forced last token
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        CALL_ID, "get_weather", {"city": "Paris"})
    assert not (choice.message.content or "").strip()
    # streamed: the same call, assembled from deltas
    name, args, ids = "", "", set()
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            ids.add(d.id) if d.id else None
            name += (d.function.name or "") if d.function else ""
            args += (d.function.arguments or "") if d.function else ""
    assert (ids, name, json.loads(args)) == ({CALL_ID}, "get_weather", {"city": "Paris"})


def test_tool_result_turn_renders_and_matches_transformers(client, ref_tok, hf_model, stop_ids):
    call = {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=SERVED_NAME, messages=messages, tools=TOOLS, max_tokens=8,
                                       temperature=0)
    declared = json.dumps([{"function": {"description": "Weather of a city", "name": "get_weather",
                                         "parameters": {"properties": {"city": {"type": "string"}},
                                                        "required": ["city"], "type": "object"}},
                            "type": "function"}], ensure_ascii=False)
    prompt = ref_tok.encode(chat_prompt(
        f"<|im_system|>tool_declare<|im_middle|>{declared}<|im_end|>",
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>",
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>",
        "<|im_assistant|>assistant<|im_middle|>" + TOOL_CALL_TEXT,
        f"<|im_system|>tool<|im_middle|>## Return of {CALL_ID}\nsunny, 21 C<|im_end|>"))
    assert r.usage.prompt_tokens == len(prompt)
    want, _ = hf_greedy(hf_model, prompt, 8, stop_ids)
    assert r.usage.completion_tokens == len(want)


def test_special_id_past_the_embedding_refused(server, published_dir, ref_tok):
    """The published tokenizer reserves 258 ids, the model embeds 256: text naming one of the
    two extra ids gets a 400 naming it, and the engine goes on."""
    last = ref_tok.num_base + 257
    body = {"model": SERVED_NAME, "prompt": f"hi <|reserved_token_{last}|>", "max_tokens": 2}
    r = requests.post(server.url("/v1/completions"), json=body, timeout=60)
    assert r.status_code == 400 and f"Token id {last} is out of vocabulary" in r.text, r.text
    body["prompt"] = "hi"
    assert requests.post(server.url("/v1/completions"), json=body, timeout=60).status_code == 200


def test_trust_remote_code_given_anyway(tmp_path_factory, published_dir, ref_tok):
    """--trust-remote-code (the model card's flag) changes nothing: the same tokenizer is picked
    (the checkpoint's auto_map is not followed) and the server answers."""
    with serve_tiny(tmp_path_factory.mktemp("trc"), "--trust-remote-code", model_dir=published_dir) as s:
        text = "你好 世界 getHTTPResponse don't"
        r = requests.post(s.url("/tokenize"), json={"model": SERVED_NAME, "prompt": text}, timeout=60)
        assert r.json()["tokens"] == ref_tok.encode(text)
        r = requests.post(s.url("/v1/chat/completions"), timeout=60, json={
            "model": SERVED_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ref_tok.encode(chat_prompt(
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>",
            f"<|im_user|>user<|im_middle|>{text}<|im_end|>")))
