"""Bad input and access control (issue #5), against ONE server started with `--api-key` through
the README's serve command on the tiny model:

* each bad request gets a 4xx whose message names the problem, and the server goes on serving;
* valid but unusual text (emoji, right-to-left, zero-width, NUL, astral-plane characters) is
  served; text that is not Unicode (lone surrogates, invalid UTF-8) is a 4xx;
* a bounded, seeded schema fuzz of /v1/chat/completions (hypothesis) never gets a 5xx and leaves
  a live, correct engine;
* requests without the key or with a wrong one get 401; with it, 200.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import requests

from tests.reliability_util import chat_body, error_message, server_fixture
from vllm_kimi_linear.tools.harness import MAX_MODEL_LEN, SERVED_NAME, wait_idle

openai = pytest.importorskip("openai")

KEY = "reliability-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBE = {"model": SERVED_NAME, "temperature": 0, "max_tokens": 16,
         "messages": [{"role": "user", "content": "Name three colours of the sea at dawn."}]}
FUZZ_EXAMPLES = 200


server = server_fixture(api_key=KEY)


@pytest.fixture(scope="module")
def probe_text(server):
    r = requests.post(server.url("/v1/chat/completions"), json=PROBE, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def post(server, body=None, raw: bytes | str | None = None, headers=None, path="/v1/chat/completions"):
    h = dict(AUTH if headers is None else headers)
    if raw is not None:
        return requests.post(server.url(path), data=raw, timeout=300,
                             headers={**h, "Content-Type": "application/json"})
    return requests.post(server.url(path), json=body, headers=h, timeout=300)


def assert_serving(server, probe_text=None):
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
    r = post(server, PROBE)
    assert r.status_code == 200, r.text
    if probe_text is not None:
        assert r.json()["choices"][0]["message"]["content"] == probe_text


LONG = "hello " * 3000  # > 2048 tokens with the tiny model's tokenizer
MSG = [{"role": "user", "content": "hello there"}]
M = SERVED_NAME

# name -> (body or raw bytes, expected status, pattern the message must match, known gap or None)
BAD = {
    "prompt_longer_than_max_model_len": ({"model": M, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4},
                                         400, r"maximum context length is 2048 tokens.*prompt contains", None),
    "prompt_longer_than_max_model_len_streamed": (
        {"model": M, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4, "stream": True},
        400, r"maximum context length is 2048 tokens", None),
    "max_tokens_zero": ({"model": M, "messages": MSG, "max_tokens": 0}, 400, r"max_tokens must be at least 1, got 0", None),
    "max_tokens_zero_streamed": ({"model": M, "messages": MSG, "max_tokens": 0, "stream": True}, 400,
                                 r"max_tokens must be at least 1, got 0", None),
    "max_completion_tokens_zero": ({"model": M, "messages": MSG, "max_completion_tokens": 0}, 400,
                                   r"max_tokens must be at least 1, got 0", None),
    "max_tokens_negative": ({"model": M, "messages": MSG, "max_tokens": -5}, 400, r"max_tokens must be at least 1, got -5", None),
    "max_tokens_huge": ({"model": M, "messages": MSG, "max_tokens": 100000}, 400,
                        r"max_tokens=100000 cannot be greater than max_model_len=2048", None),
    "max_tokens_2_pow_63": ({"model": M, "messages": MSG, "max_tokens": 2**63}, 400, r"max_tokens", None),
    "malformed_json": (b'{"model": "kimi-linear-tiny", "messages": [', 400, r"JSON decode error", None),
    "not_json": (b"hello", 400, r"JSON decode error", None),
    "empty_body": (b"", 400, r"body.*Field required|Field required", None),
    "body_is_a_list": ([1, 2], 400, r"valid dictionary", None),
    "invalid_utf8": (b'{"model":"kimi-linear-tiny","messages":[{"role":"user","content":"\xff\xfe"}]}',
                     400, r"error parsing the body", None),
    "nan_temperature": (b'{"model":"kimi-linear-tiny","messages":[{"role":"user","content":"x"}],"temperature":NaN}',
                        400, r"temperature", None),
    "messages_is_a_string": ({"model": M, "messages": "hello"}, 400, r"body\.messages.*valid list", None),
    "messages_missing": ({"model": M}, 400, r"body\.messages.*Field required", None),
    "message_without_role": ({"model": M, "messages": [{"content": "x"}]}, 400, r"role.*Field required", None),
    "content_is_a_number": ({"model": M, "messages": [{"role": "user", "content": 5}]}, 400,
                            r"body\.messages\.0\..*content", None),
    "temperature_is_a_string": ({"model": M, "messages": MSG, "temperature": "hot"}, 400,
                                r"body\.temperature.*valid number", None),
    "max_tokens_is_a_string": ({"model": M, "messages": MSG, "max_tokens": "ten"}, 400,
                               r"body\.max_tokens.*valid integer", None),
    "max_tokens_fractional": ({"model": M, "messages": MSG, "max_tokens": 2.5}, 400, r"body\.max_tokens.*integer", None),
    "stop_is_a_number": ({"model": M, "messages": MSG, "stop": 5}, 400, r"body\.stop", None),
    "model_is_a_number": ({"model": 5, "messages": MSG}, 400, r"body\.model.*valid string", None),
    "unknown_model": ({"model": "no-such-model", "messages": MSG}, 404, r"model `no-such-model` does not exist", None),
    "empty_messages": ({"model": M, "messages": []}, 400, r"empty conversation", None),
    "negative_temperature": ({"model": M, "messages": MSG, "temperature": -1}, 400, r"temperature must be non-negative", None),
    "top_p_above_1": ({"model": M, "messages": MSG, "top_p": 2}, 400, r"top_p must be in \(0, 1\]", None),
    "top_logprobs_huge": ({"model": M, "messages": MSG, "logprobs": True, "top_logprobs": 100000}, 400,
                          r"logprobs.*max allowed", None),
    "n_above_1_greedy": ({"model": M, "messages": MSG, "n": 2, "temperature": 0}, 400,
                         r"n must be 1 when using greedy sampling", None),
    "n_zero": ({"model": M, "messages": MSG, "n": 0}, 400, r"n must be at least 1", None),
    "n_huge": ({"model": M, "messages": MSG, "n": 100000, "temperature": 1}, 400, r"n must be at most 16384", None),
    "lone_surrogate": (b'{"model":"kimi-linear-tiny","max_tokens":4,"messages":[{"role":"user","content":"x\\ud800y"}]}',
                       400, r"messages\[0\]\.content contains a lone UTF-16 surrogate \(U\+D[8C]00\)", None),
    "lone_surrogate_streamed": (
        b'{"model":"kimi-linear-tiny","max_tokens":4,"stream":true,"messages":[{"role":"user","content":"x\\udc00y"}]}',
        400, r"messages\[0\]\.content contains a lone UTF-16 surrogate \(U\+D[8C]00\)", None),
}


def _send(server, spec):
    return post(server, raw=spec) if isinstance(spec, bytes) else post(server, spec)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_4xx_and_the_server_goes_on(server, probe_text, case):
    spec, status, _, _ = BAD[case]
    r = _send(server, spec)
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert error_message(r).strip(), r.text[:500]
    assert_serving(server)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=BAD[c][3]))
                                  if BAD[c][3] else c for c in BAD])
def test_bad_request_message_names_the_problem(server, case):
    spec, status, pattern, _ = BAD[case]
    r = _send(server, spec)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    msg = error_message(r)
    print(f"{case}: {r.status_code} {msg[:200]!r}")
    assert re.search(pattern, msg, re.S), msg


# Valid text that merely looks unusual must be served, in whole and streamed answers.
UNUSUAL = {
    "emoji": "Describe 😀🌊🐙👩‍👩‍👧 and 🏳️‍🌈 briefly.",
    "right_to_left": "مرحبا بالعالم שלום עולם \u202eoverride\u202c mixed",
    "zero_width": "zero\u200bwidth\u200cjoin\u200dand\ufeffBOM\u2060word",
    "nul_and_controls": "before\u0000after\u0001\u001f\u007f end",
    "astral_and_combining": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301\u0302\u0303 \U0010fffd \ufffe",
    "line_separators": "one\u2028two\u2029three\u0085four\r\nfive",
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(UNUSUAL))
def test_unusual_but_valid_unicode_is_served(server, case, stream):
    body = chat_body(UNUSUAL[case], 8)
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    if stream:
        text, finish = "", None
        for ch in client.chat.completions.create(stream=True, **body):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
        whole = client.chat.completions.create(**body)
        assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    else:
        r = client.chat.completions.create(**body)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > len(UNUSUAL[case].encode()) // 4


def test_n_above_1_with_long_outputs(server, probe_text):
    """Valid: n=4 sampled answers of 1024 tokens each are all generated (ignore_eos), in one
    response, and the server goes on serving. (vLLM accepts n up to VLLM_MAX_N_SEQUENCES=16384.)"""
    body = chat_body("Tell a long story.", 1024, n=4, temperature=0.8, ignore_eos=True)
    r = post(server, body)
    assert r.status_code == 200, r.text[:500]
    d = r.json()
    assert len(d["choices"]) == 4 and {c["finish_reason"] for c in d["choices"]} == {"length"}
    assert d["usage"]["completion_tokens"] == 4 * 1024
    assert len({c["message"]["content"] for c in d["choices"]}) > 1  # four samples, not one copied
    assert wait_idle(server.base, AUTH)["vllm:kv_cache_usage_perc"] == 0
    assert_serving(server, probe_text)


def test_prompt_plus_max_tokens_over_the_limit_is_capped(server):
    """Recorded behaviour: a prompt that fits with a max_tokens that does not is accepted, and the
    answer stops at max_model_len (finish_reason 'length'), rather than a 400 as OpenAI's API does."""
    tok = requests.post(server.url("/tokenize"), json={"model": M, "messages": [{"role": "user", "content": "hello " * 900}]},
                        headers=AUTH, timeout=60).json()["count"]
    assert tok < MAX_MODEL_LEN - 8
    r = post(server, chat_body("hello " * 900, MAX_MODEL_LEN - tok + 50, ignore_eos=True))
    assert r.status_code == 200, r.text[:500]
    d = r.json()
    assert d["usage"]["prompt_tokens"] == tok and d["usage"]["total_tokens"] == MAX_MODEL_LEN
    assert d["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------------- schema fuzz

def _strategies():
    """Request bodies for the fuzz: 8 in 10 are a valid request with at most one thing broken
    (a field replaced by a wrong type or out-of-range value, a required field dropped, an unknown
    field added, or one message mangled); the rest are arbitrary JSON or bytes."""
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
    anything = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=3)),
                            max_leaves=6)
    text = st.text(max_size=60)  # any code point but lone surrogates
    any_text = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=20)
    # invalid counts; none of them may mean "a long answer" (None or "1500" would be the rest of
    # the context: seconds each on 2 cores)
    bad_count = st.one_of(st.integers(-3, 0), st.integers(MAX_MODEL_LEN + 1, 2**64), st.booleans(),
                          st.floats().filter(lambda f: f != f or abs(f) > MAX_MODEL_LEN or f != int(f)),
                          st.text(st.characters(exclude_categories=("Nd",)), max_size=8),
                          st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), scalar, max_size=2))
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "bogus"]),
                                  "text": text}, optional={"image_url": anything})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                     "content": text}, optional={"name": st.text(max_size=8)})
    optional = {
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
        "min_p": st.floats(0, 1), "n": st.integers(1, 3),
        "seed": st.integers(0, 2**31), "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "stop": st.one_of(text, st.lists(text, max_size=3)), "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20), "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
        "logit_bias": st.dictionaries(st.integers(0, 1100).map(str), st.floats(-100, 100), max_size=3),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "min_tokens": st.integers(0, 4),
        "user": text, "echo": st.booleans(), "add_generation_prompt": st.booleans(),
    }

    @st.composite
    def body(draw):
        if draw(st.integers(0, 9)) >= 8:
            return draw(st.one_of(anything, st.binary(max_size=64)))
        b = {"model": SERVED_NAME, "messages": draw(st.lists(message, min_size=1, max_size=3)),
             "max_tokens": draw(st.integers(1, 12))}
        b.update(draw(st.fixed_dictionaries({}, optional=optional)))
        how = draw(st.sampled_from(["none", "none", "none", "replace", "replace", "drop", "add", "message"]))
        if how == "replace":
            key = draw(st.sampled_from(["model", "messages", "max_tokens", *optional]))
            b[key] = draw(bad_count if key in ("max_tokens", "n") else anything)
        elif how == "drop":
            del b[draw(st.sampled_from(["model", "messages", "max_tokens"]))]
            b.setdefault("max_tokens", 8)
        elif how == "add":
            b[draw(st.text(min_size=1, max_size=12))] = draw(anything)
        elif how == "message":
            m = b["messages"][draw(st.integers(0, len(b["messages"]) - 1))]
            key = draw(st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]))
            m[key] = draw(st.one_of(anything, any_text, st.lists(part, max_size=2),
                                    st.sampled_from(["tool", "function", "wizard", ""])))
        return b

    return body()


def _check_fuzz_response(r: requests.Response, body) -> int:
    where = f"request body: {body!r:.1500}"
    assert r.status_code < 500, f"{r.status_code} {r.text[:800]}\n{where}"
    if r.status_code >= 400:
        assert error_message(r).strip(), f"{r.status_code} without a message: {r.text[:500]}\n{where}"
        return r.status_code
    if "text/event-stream" in r.headers.get("content-type", ""):
        for line in r.content.split(b"\n"):
            line = line.rstrip(b"\r")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            err = event.get("error") if isinstance(event, dict) else None
            assert not err or int(err.get("code") or 0) < 500, f"error event {line[:600]!r}\n{where}"
    else:
        d = r.json()
        assert d.get("choices"), f"200 without choices: {r.text[:500]}\n{where}"
    return r.status_code


def test_schema_fuzz_chat_completions_no_5xx(server, probe_text):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, Phase, given, settings

    seen: Counter = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(_strategies())
    def fuzz(body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = requests.post(server.url("/v1/chat/completions"), data=raw, timeout=300,
                          headers={**AUTH, "Content-Type": "application/json"})
        seen[_check_fuzz_response(r, body)] += 1

    fuzz()
    print(f"fuzz statuses: {dict(seen)}")
    assert sum(seen.values()) >= FUZZ_EXAMPLES * 0.9
    assert seen[200] >= 10 and sum(v for k, v in seen.items() if 400 <= k < 500) >= 10, seen
    idle = wait_idle(server.base, AUTH)
    assert idle and all(v == 0 for v in idle.values()), idle
    assert_serving(server, probe_text)


# ------------------------------------------------------------------------------------ access

@pytest.mark.parametrize("path,method", [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                                         ("/v1/models", "get")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
                         ids=["no_key", "wrong_key", "no_scheme", "basic_scheme"])
def test_without_the_right_key_401(server, path, method, headers):
    body = chat_body("hi", 2) if "chat" in path else {"model": M, "prompt": "hi", "max_tokens": 2}
    r = requests.request(method, server.url(path), json=body if method == "post" else None,
                         headers=headers, timeout=60)
    assert r.status_code == 401, (r.status_code, r.text[:300])
    assert error_message(r) == "Unauthorized", r.text


@pytest.mark.parametrize("path,body", [
    ("/invocations", chat_body("hi", 2)),
    ("/generative_scoring", {"model": M, "query": "a", "items": ["b"], "label_token_ids": [1, 2]}),
    ("/tokenize", {"model": M, "prompt": "hi"}),
], ids=["invocations", "generative_scoring", "tokenize"])
def test_inference_routes_outside_v1_need_the_key_too(server, path, body):
    # vLLM guards /v1, /v2, /inference, /cohere; the plugin adds these (patches/api_key_guard.py)
    r = requests.post(server.url(path), json=body, timeout=60)
    assert r.status_code == 401, (r.status_code, r.text[:300])
    r = requests.post(server.url(path), json=body, headers=AUTH, timeout=60)
    assert r.status_code != 401, (r.status_code, r.text[:300])


def test_with_the_key_200_and_openai_client_errors_clearly(server, probe_text):
    ok = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list().data] == [SERVED_NAME]
    assert ok.chat.completions.create(**PROBE).choices[0].message.content == probe_text
    bad = openai.OpenAI(base_url=server.url("/v1"), api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**PROBE)
    with pytest.raises(openai.AuthenticationError):
        list(bad.chat.completions.create(stream=True, **PROBE))
    # the probes a load balancer or Kubernetes uses stay open (vLLM guards /v1 only)
    assert requests.get(server.url("/health"), timeout=10).status_code == 200


# ------------------------------------------------------------------------------ seeded sampling

@pytest.mark.parametrize("n", [1, 2])
def test_seeded_sampling_is_served_and_reproducible(server, probe_text, n):
    """A seeded sampled request whose prompt (20 tokens) the scheduler prefills in pieces (16 + 4:
    block-aligned for the KDA prefix cache; the second time, 4 after a prefix hit) is answered,
    the same both times. This used to kill the engine on CPU: vLLM rewinds a discarded sample's
    generator by its Philox offset, which CPU generators lack (vllm_kimi_linear/patches/cpu_model_runner.py
    now rewinds by state)."""
    body = chat_body("Tell a long story.", 24, temperature=0.8, seed=7, n=n)
    first = post(server, body)
    assert first.status_code == 200, (first.status_code, first.text[:300])
    again = post(server, body)
    assert again.status_code == 200, (again.status_code, again.text[:300])
    texts = [[c["message"]["content"] for c in r.json()["choices"]] for r in (first, again)]
    assert texts[0] == texts[1]
    assert_serving(server, probe_text)
