"""Soak: a bounded, mixed load against a Kimi Linear server while sampling the resident memory of
the server's processes (API server + engine core + worker) and the in-use gauges of /metrics.

    python -m loadtests.soak                      # starts deploy/serve-cpu.sh on the tiny model
    python -m loadtests.soak --minutes 5 --json soak.json
    python -m loadtests.soak --base-url http://127.0.0.1:8000 --pid <API server pid> --minutes 2

The mix (seeded, so runs are comparable): streamed and whole chat completions of varied prompt
and output lengths (greedy), clients that drop the connection after a few chunks, and bad
requests that must get a 4xx. Prints requests sent, errors, RSS at the start (after warm-up),
end (once idle) and max, and what the in-use gauges read once idle; writes it all as JSON.
Exit status 1 if any request failed unexpectedly or something is still held once idle.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from vllm_kimi_linear.tools.harness import (MAX_MODEL_LEN, SERVED_NAME, in_use, rss_bytes, scrape,
                                            serve_tiny, wait_idle)

WORDS = ("sea dawn light river stone cloud wind green blue amber quiet north harbour tide salt "
         "gull reef foam glass ember").split()
MiB = 1 << 20


def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def sse_lines(response):
    """Lines of a server-sent-event stream, split on LF only. (httpx's aiter_lines splits like
    str.splitlines, i.e. also inside JSON strings at U+2028, U+0085 or U+001C, which the model's
    random byte-level tokens do produce.)"""
    buf = b""
    async for chunk in response.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8")


class Load:
    def __init__(self, base: str, api_key: str | None, seed: int):
        import httpx
        self.base = base
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), headers=self.headers,
                                      limits=httpx.Limits(max_connections=256))
        self.rng = random.Random(seed)
        self.counts = {"sent": 0, "ok": 0, "rejected_as_expected": 0, "disconnected": 0,
                       "errors": 0}
        self.errors: list[str] = []

    def _error(self, kind: str, detail: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {detail[:300]}")

    async def one(self) -> None:
        rng = self.rng
        kind = rng.choices(["stream", "whole", "drop", "bad"], weights=[6, 2, 1, 1])[0]
        body = {"model": SERVED_NAME, "temperature": 0,
                "messages": [{"role": "user", "content": _prompt(rng, rng.choice([3, 20, 80, 300]))}],
                "max_tokens": rng.choice([8, 16, 32, 64])}
        self.counts["sent"] += 1
        url = self.base + "/v1/chat/completions"
        try:
            if kind == "bad":
                body = dict(body, max_tokens=rng.choice([0, -1, MAX_MODEL_LEN + 1]))
                r = await self.http.post(url, json=body)
                if 400 <= r.status_code < 500:
                    self.counts["rejected_as_expected"] += 1
                else:
                    self._error(kind, f"status {r.status_code}: {r.text}")
            elif kind == "whole":
                r = await self.http.post(url, json=body)
                if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"):
                    self.counts["ok"] += 1
                else:
                    self._error(kind, f"status {r.status_code}: {r.text}")
            else:
                body = dict(body, stream=True)
                if kind == "drop":
                    body["max_tokens"] = 1000
                chunks, finish = 0, None
                async with self.http.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        self._error(kind, f"status {r.status_code}: {(await r.aread()).decode()}")
                        return
                    async for line in sse_lines(r):
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        d = json.loads(line[6:])
                        if "error" in d:
                            self._error(kind, f"error event: {line}")
                            return
                        chunks += 1
                        if d.get("choices") and d["choices"][0].get("finish_reason"):
                            finish = d["choices"][0]["finish_reason"]
                        if kind == "drop" and chunks >= 3:
                            break  # leaving the block closes the connection mid-stream
                if kind == "drop":
                    self.counts["disconnected"] += 1
                elif finish in ("stop", "length"):
                    self.counts["ok"] += 1
                else:
                    self._error(kind, f"stream ended without a finish_reason after {chunks} chunks")
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            self._error(kind, f"{type(e).__name__}: {e}")

    async def worker(self, stop_at: float) -> None:
        while time.time() < stop_at:
            await self.one()


async def soak(base: str, pid: int | None, minutes: float, concurrency: int, warmup_s: float,
               sample_s: float, api_key: str | None, seed: int = 0, log=print) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    load = Load(base, api_key, seed)
    samples: list[dict] = []
    t0 = time.time()
    stop_at = t0 + minutes * 60

    def sample(phase: str) -> dict:
        s = {"t": round(time.time() - t0, 1), "phase": phase}
        if pid:
            total, per = rss_bytes(pid)
            s |= {"rss_mib": round(total / MiB, 1),
                  "rss_mib_by_process": {role(p): round(v / MiB, 1) for p, v in per.items()}}
        try:
            s["in_use"] = in_use(scrape(base, headers))
        except Exception as e:  # noqa: BLE001
            s["in_use_error"] = repr(e)
        s["requests"] = dict(load.counts)
        samples.append(s)
        return s

    async def sampler():
        while time.time() < stop_at:
            await asyncio.to_thread(sample, "load")
            s = samples[-1]
            log(f"[{s['t']:7.1f} s] rss {s.get('rss_mib', '?')} MiB  in-use {s.get('in_use')}  "
                f"{s['requests']}")
            await asyncio.sleep(sample_s)

    await asyncio.gather(sampler(), *(load.worker(stop_at) for _ in range(concurrency)))
    await load.http.aclose()
    idle = await asyncio.to_thread(wait_idle, base, headers, 60)
    end = await asyncio.to_thread(sample, "idle")

    rss = [(s["t"], s["rss_mib"]) for s in samples if "rss_mib" in s]
    first_after = next((s for s in samples if "rss_mib" in s and s["t"] >= warmup_s), None)
    after_warmup = [v for t, v in rss if t >= warmup_s] or [v for _, v in rss]
    summary = {
        "base_url": base, "minutes": minutes, "concurrency": concurrency, "warmup_s": warmup_s,
        "requests": load.counts, "error_samples": load.errors,
        "idle_in_use": idle, "idle_clean": bool(idle) and all(v == 0 for v in idle.values()),
        "duration_s": round(time.time() - t0, 1),
    }
    if rss:
        summary |= {"rss_first_mib": rss[0][1], "rss_start_mib": after_warmup[0],
                    "rss_end_mib": end["rss_mib"], "rss_max_mib": max(v for _, v in rss),
                    "rss_growth_after_warmup_mib": round(end["rss_mib"] - after_warmup[0], 1)}
        if first_after is not None:
            a, b = first_after["rss_mib_by_process"], end["rss_mib_by_process"]
            summary["rss_growth_by_process_mib"] = {k: round(b[k] - a[k], 1) for k in b if k in a}
    summary["samples"] = samples
    return summary


_roles: dict[int, str] = {}


def role(pid: int) -> str:
    """A readable, stable name for a server process: api_server, engine_core, worker_N, ..."""
    if pid not in _roles:
        import psutil
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            cmd = ""
        name = ("engine_core" if "EngineCore" in cmd else "worker" if "Worker" in cmd else
                "api_server" if "serve" in cmd or "api_server" in cmd else
                "resource_tracker" if "resource_tracker" in cmd else "other")
        taken = set(_roles.values())
        base, n = name, 1
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        _roles[pid] = name
    return _roles[pid]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="a running server (default: start deploy/serve-cpu.sh on the tiny model)")
    ap.add_argument("--pid", type=int, help="the running server's API-server pid, for memory sampling")
    ap.add_argument("--api-key")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup-s", type=float, help="RSS start is the first sample after this (default: "
                                                  "40%% of the run, at most 120 s)")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the summary and samples here")
    args = ap.parse_args(argv)
    warmup = args.warmup_s if args.warmup_s is not None else min(120.0, args.minutes * 60 * 0.4)

    base, pid = args.base_url, args.pid
    with contextlib.ExitStack() as stack:
        if base is None:
            server = stack.enter_context(serve_tiny(Path(tempfile.mkdtemp(prefix="kimi-soak-")),
                                                    api_key=args.api_key, timeout=600))
            base, pid = server.base, server.pid
            print(f"server {base} (pid {pid}), log {server.log_path}")
        s = asyncio.run(soak(base.rstrip("/"), pid, args.minutes, args.concurrency, warmup,
                             args.sample_s, args.api_key, args.seed))
    print(json.dumps({k: v for k, v in s.items() if k != "samples"}, indent=1))
    if "rss_start_mib" in s:
        print(f"RSS (MiB): first {s['rss_first_mib']}, start after {warmup:.0f} s warm-up "
              f"{s['rss_start_mib']}, end (idle) {s['rss_end_mib']}, max {s['rss_max_mib']}, "
              f"growth {s['rss_growth_after_warmup_mib']} {s.get('rss_growth_by_process_mib')}")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0 if s["requests"]["errors"] == 0 and s["idle_clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
