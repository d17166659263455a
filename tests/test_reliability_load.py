"""Serving under load and client faults (issue #5), through the README's serve command on the
tiny model, with the `openai` client. One server for the module:

* 64 concurrent streamed greedy chat completions of mixed lengths: no errors, and each stream's
  text equals the same request served alone;
* 50 clients that drop the connection mid-stream: the server stays healthy and correct, their
  requests are aborted, and once idle nothing is held (vLLM's KV-cache usage and running count,
  and the plugin's KDA-slot / MLA-block gauges when /metrics has them, all read 0);
* a short soak (loadtests/soak.py): no errors, bounded RSS growth after warm-up, nothing held once idle.
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.reliability_util import server_fixture
from vllm_kimi_linear.tools.harness import PLUGIN_IN_USE, ROOT, SERVED_NAME, in_use, scrape, wait_idle

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

WORDS = "sea dawn light river stone cloud wind green blue amber quiet north harbour tide".split()
PROBE = {"model": SERVED_NAME, "temperature": 0, "max_tokens": 24,
         "messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Name three colours of the sea at dawn."}]}
SOAK_SECONDS = 75
# Under glibc's default malloc the worker keeps freed tensor memory (its RSS rose 120-170 MiB in
# a few minutes, shape by shape), which made this bound flaky. This module's server trims it (at
# ~24% of throughput, README "Reliability"). What is left in 75 s is the worker still meeting new
# shapes (83 MiB when the soak runs first; a 5-minute soak with a 2-minute warm-up stays within a
# few MiB); a leak of ~0.3 MiB per request over the ~500 requests exceeds the bound.
FLAT_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "4194304"}
SOAK_RSS_GROWTH_MIB = 160
SOAK_BOOKKEEPING_GROWTH_MIB = 32


server = server_fixture(extra_env=FLAT_MALLOC)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def probe_text(client):
    """The probe request's answer before any load or fault: later answers must equal it."""
    r = client.chat.completions.create(**PROBE)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    return r.choices[0].message.content


def assert_healthy_and_correct(server, client, probe_text):
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
    r = client.chat.completions.create(**PROBE)
    assert r.choices[0].message.content == probe_text


def mixed_requests(n: int, seed: int = 0) -> list[dict]:
    """n greedy chat requests: prompts from a few words to ~1,200 tokens (several prefill
    chunks), outputs of 4 to 96 tokens, some sharing a system prompt (prefix-cache hits)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice([2, 10, 40, 150, 300, 500])
        msgs = [{"role": "user", "content": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(words))}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You answer in the voice of a lighthouse keeper. " * 8})
        out.append({"model": SERVED_NAME, "messages": msgs, "temperature": 0,
                    "max_tokens": rng.choice([4, 16, 48, 96])})
    return out


async def stream_text(aclient, body: dict) -> tuple[str, str | None, int]:
    text, finish, chunks = "", None, 0
    async for ch in await aclient.chat.completions.create(stream=True, **body):
        if ch.choices:
            chunks += 1
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish, chunks


class GaugeWatch:
    """Samples /metrics in a thread while a block runs; keeps the max of each in-use gauge."""

    def __init__(self, base: str, period: float = 0.25):
        self.base, self.period, self.max, self._stop = base, period, {}, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            try:
                for k, v in in_use(scrape(self.base, timeout=5)).items():
                    self.max[k] = max(v, self.max.get(k, 0.0))
            except requests.RequestException:
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def test_64_concurrent_streams_equal_each_served_alone(server, client, probe_text):
    reqs = mixed_requests(64)

    async def alone():
        async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused",
                                      max_retries=0, timeout=300) as ac:
            return [await stream_text(ac, b) for b in reqs]

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0,
                                      timeout=300, http_client=httpx.AsyncClient(
                                          limits=httpx.Limits(max_connections=128))) as ac:
            return await asyncio.gather(*(stream_text(ac, b) for b in reqs), return_exceptions=True)

    solo = asyncio.run(alone())
    with GaugeWatch(server.base) as watch:
        t0 = time.time()
        conc = asyncio.run(together())
        took = time.time() - t0
    errors = [(i, repr(r)) for i, r in enumerate(conc) if isinstance(r, BaseException)]
    assert errors == [], errors
    assert all(f in ("stop", "length") and n > 0 for _, f, n in solo)
    differ = [(i, solo[i], conc[i]) for i in range(len(reqs)) if conc[i][:2] != solo[i][:2]]
    assert differ == [], f"{len(differ)} of 64 streams differ from the request served alone: {differ[:3]}"
    # they were in flight together, not one after another
    assert watch.max.get("vllm:num_requests_running", 0) >= 16, (watch.max, took)
    idle = wait_idle(server.base)
    assert idle and all(v == 0 for v in idle.values()), idle
    assert_healthy_and_correct(server, client, probe_text)


def test_dropped_streams_are_aborted_and_free_their_state(server, client, probe_text):
    n_clients, max_tokens = 50, 1000
    before = scrape(server.base)
    rng = random.Random(1)

    async def drop(i: int) -> int:
        body = {"model": SERVED_NAME, "temperature": 0, "stream": True, "max_tokens": max_tokens,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"{i} " + " ".join(
                    rng.choice(WORDS) for _ in range(rng.choice([5, 60, 200, 400])))}]}
        chunks = 0
        # one client (one connection) per request; leaving the blocks closes it mid-stream
        async with httpx.AsyncClient(timeout=120) as c:
            async with c.stream("POST", server.url("/v1/chat/completions"), json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_raw():
                    chunks += line.count(b"data: {")
                    if chunks >= 3:
                        break
        return chunks

    async def all_drop():
        return await asyncio.gather(*(drop(i) for i in range(n_clients)), return_exceptions=True)

    got = asyncio.run(all_drop())
    errors = [g for g in got if isinstance(g, BaseException)]
    assert errors == [], errors[:3]
    # every request was generating when its client left (a gauge sampled every 0.25 s can miss
    # 50 requests that each live for three tokens on a fast machine; the streams cannot)
    assert all(c >= 3 for c in got), got

    idle = wait_idle(server.base, timeout=60)
    assert idle.get("vllm:kv_cache_usage_perc") == 0.0, idle
    assert idle.get("vllm:num_requests_running") == 0.0, idle
    for name in PLUGIN_IN_USE:  # the plugin's own gauges, when this build has them
        if name in idle:
            assert idle[name] == 0, idle
    after = scrape(server.base)
    # aborted, not run to the end: 50 x 1000 tokens would have been generated otherwise
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < n_clients * max_tokens / 4, generated
    finished = (after.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0))
    assert finished == 0, f"{finished} of the dropped requests ran to completion"
    assert_healthy_and_correct(server, client, probe_text)


def test_short_soak_bounded_memory_and_nothing_held(server, client, probe_text, tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "loadtests.soak", "--base-url", server.base,
                        "--pid", str(server.pid), "--minutes", str(SOAK_SECONDS / 60),
                        "--warmup-s", "25", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=SOAK_SECONDS + 180)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    print({k: v for k, v in s.items() if k != "samples"})
    assert s["requests"]["errors"] == 0, s["error_samples"]
    assert s["requests"]["ok"] > 50 and s["requests"]["disconnected"] > 0, s["requests"]
    assert s["requests"]["rejected_as_expected"] > 0, s["requests"]
    assert s["idle_clean"], s["idle_in_use"]
    assert "vllm:kv_cache_usage_perc" in s["idle_in_use"], s["idle_in_use"]
    growth = s["rss_growth_by_process_mib"]
    assert {"api_server", "engine_core", "worker"} <= set(growth), growth
    # request bookkeeping lives in the API server and the engine core: they must stay flat
    assert growth["api_server"] < SOAK_BOOKKEEPING_GROWTH_MIB and growth["engine_core"] < SOAK_BOOKKEEPING_GROWTH_MIB, growth
    # the worker's heap grows with the tensor shapes it has seen, then levels off
    assert s["rss_growth_after_warmup_mib"] < SOAK_RSS_GROWTH_MIB, (
        f"server RSS grew {s['rss_growth_after_warmup_mib']} MiB after warm-up "
        f"({s['rss_start_mib']} -> {s['rss_end_mib']} MiB): {growth}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_healthy_and_correct(server, client, probe_text)


def test_server_log_has_no_errors(server):
    """After the load, the dropped clients and the soak: no traceback and no ERROR line from any
    server process (a dropped client is an abort, not an error)."""
    log = server.log_path.read_text()
    bad = [ln for ln in log.splitlines() if "Traceback" in ln or " ERROR " in ln]
    assert bad == [], "\n".join(bad[:20])
