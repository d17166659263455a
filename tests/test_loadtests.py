"""The load generator (loadtests/).

1. Pure parts, no server: percentiles, SLO/goodput, summaries, arrival schedules, request-class
   mixes and scaling, scenarios, exact-length prompt construction with the tiny model's own
   tokenizer (local), the speed-up benchmark's window arithmetic, plots.
2. CPU smoke: ONE tiny-model server for the module (deploy/serve-cpu.sh); every named scenario,
   scaled to <= ~8K tokens and a handful of requests, completes with 0 errors and writes a
   result.json whose numbers are consistent (exact prompt lengths from usage, ordered percentiles)
   and its PNGs; errors are reported by type; --max-duration bounds a run.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest
import requests

from loadtests import cli, hybrid_speedup, report
from loadtests.metrics import SLO, RequestRecord, distribution, goodput, percentile, summarize
from loadtests.prompts import PromptBuilder, common_prefix
from loadtests.scenarios import SCENARIOS
from loadtests.workload import Arrival, RequestClass, Workload
from vllm_kimi_linear.tools.harness import free_port, running_process, server_env

ROOT = Path(__file__).resolve().parents[1]
SERVED = "kimi-linear-tiny"
MAX_LEN = 10000
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# 1. Pure parts
# ---------------------------------------------------------------------------------------------

def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 7, 100):
        xs = [rng.random() * 100 for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def rec(i, ttft=0.1, e2e=1.0, out=10, error=None, itl=(0.1,)):
    return RequestRecord(index=i, cls="c", start=0.1 * i, prompt_tokens_expected=100, prompt_tokens=100,
                         completion_tokens=out, ttft=ttft, e2e=e2e, itl=list(itl), error=error)


def test_slo_goodput_and_summary():
    slo = SLO(ttft_ms=200, tpot_ms=50)
    good = rec(0, ttft=0.1, e2e=0.1 + 9 * 0.04)           # TPOT 40 ms
    slow_first = rec(1, ttft=0.3, e2e=0.3 + 9 * 0.04)     # TTFT 300 ms
    slow_decode = rec(2, ttft=0.1, e2e=0.1 + 9 * 0.06)    # TPOT 60 ms
    one_token = rec(3, ttft=0.1, e2e=0.1, out=1)          # TPOT undefined: not a failure
    failed = rec(4, error="HTTP 500")
    timeout = rec(5, error="APITimeoutError")
    rs = [good, slow_first, slow_decode, one_token, failed, timeout]
    assert [slo.met(r) for r in rs] == [True, False, False, True, False, False]
    assert good.tpot == pytest.approx(0.04) and one_token.tpot is None
    g = goodput(rs, slo, duration=2.0)
    assert g == {"good_requests": 2, "fraction": pytest.approx(2 / 6), "requests_per_s": 1.0}
    s = summarize(rs, duration=2.0, slo=slo)
    assert s["requests"] == {"total": 6, "completed": 4, "failed": 2}
    assert s["errors"] == {"HTTP 500": 1, "APITimeoutError": 1}
    assert s["tokens"] == {"prompt": 400, "completion": 31}
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(15.5)
    assert s["ttft_ms"]["count"] == 4 and s["tpot_ms"]["count"] == 3
    d = distribution([0.001 * i for i in range(1, 101)])
    assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert d["p50"] == pytest.approx(50.5) and d["mean"] == pytest.approx(50.5)
    with pytest.raises(ValueError, match="ttft_ms must be a positive"):
        SLO(ttft_ms=0)


def test_arrival_schedules():
    assert Arrival("constant", rate=4).offsets(5) == [0, 0.25, 0.5, 0.75, 1.0]
    assert Arrival("concurrency", concurrency=3).offsets(10) is None
    p = Arrival("poisson", rate=5, seed=7)
    a = p.offsets(20000)
    assert a == Arrival("poisson", rate=5, seed=7).offsets(20000)  # seeded
    assert a != Arrival("poisson", rate=5, seed=8).offsets(20000)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert a[0] == 0 and min(gaps) >= 0
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(0.2, rel=0.03)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(1.0, rel=0.05)  # exponential gaps
    assert Arrival("poisson", rate=2, concurrency=4).label == "poisson 2 req/s, max 4 in flight"
    assert Arrival("concurrency", concurrency=3).with_value(8).concurrency == 8
    assert Arrival("constant", rate=1).with_value(2.5).rate == 2.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="uniform", rate=1), "arrival kind must be one of"),
    (dict(kind="poisson"), "needs a finite rate > 0"),
    (dict(kind="constant", rate=-1), "needs a finite rate > 0"),
    (dict(kind="concurrency"), "needs concurrency >= 1"),
    (dict(kind="concurrency", concurrency=2, rate=1), "takes no rate"),
    (dict(kind="poisson", rate=1, concurrency=0), "concurrency cap"),
])
def test_arrival_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Arrival(**kwargs)


def test_class_mix_scaling_and_validation():
    classes = (RequestClass("a", 100, 10, weight=0.7), RequestClass("b", 100, 10, weight=0.25),
               RequestClass("c", 100, 10, weight=0.05))
    w = Workload("w", classes, Arrival("constant", rate=1), num_requests=100)
    seq = [c.name for c in w.class_sequence()]
    assert (seq.count("a"), seq.count("b"), seq.count("c")) == (70, 25, 5)
    assert seq[:20].count("a") == 14 and "b" in seq[:4]  # interleaved, not sorted
    one_m = RequestClass("x", 1_000_000, 8192, prefix_tokens=0).scaled(0.008)
    assert (one_m.input_tokens, one_m.output_tokens) == (8000, 66)
    tiny = RequestClass("x", 2048, 256, prefix_tokens=1024).scaled(0.001)
    assert tiny.input_tokens >= tiny.prefix_tokens + 16 and tiny.output_tokens == 8
    with pytest.raises(ValueError, match=r"prefix_tokens must be in \[0, input_tokens=100\)"):
        RequestClass("x", 100, 10, prefix_tokens=100)
    with pytest.raises(ValueError, match="output_tokens must be a positive int"):
        RequestClass("x", 100, 0)
    with pytest.raises(ValueError, match="class names repeat"):
        Workload("w", (classes[0], classes[0]), Arrival("constant", rate=1), 3)
    with pytest.raises(ValueError, match="num_requests must be an int >= 1"):
        Workload("w", classes, Arrival("constant", rate=1), 0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        w.scaled(0)


def test_scenarios_state_their_hardware_and_scale_down(capsys):
    assert set(SCENARIOS) == {"1m-context", "mixed", "prefix-sharing", "sweep"}
    for s in SCENARIOS.values():
        assert "tensor parallel 8" in s.hardware and "H200" in s.hardware and "H100" in s.hardware
        assert "--tensor-parallel-size 8" in s.serve and "--max-model-len 1048576" in s.serve
        assert max(p.max_tokens_per_request for p in s.points) <= 1048576
        small = s.adjusted(0.008, num_requests=3)
        assert max(p.max_tokens_per_request for p in small.points) <= 8200
        assert all(p.num_requests == 3 for p in small.points)
    one_m = SCENARIOS["1m-context"].points[0].classes[0]
    assert one_m.input_tokens >= 1_000_000
    sweep = SCENARIOS["sweep"].adjusted(sweep=[1, 2, 4])
    assert [p.name for p in sweep.points] == ["c1", "c2", "c4"]
    assert [p.arrival.concurrency for p in sweep.points] == [1, 2, 4]
    rates = SCENARIOS["mixed"].adjusted(sweep=[0.5, 1])
    assert [p.arrival.rate for p in rates.points] == [0.5, 1.0]
    capped = SCENARIOS["mixed"].adjusted(concurrency=8).points[0].arrival
    assert (capped.kind, capped.rate, capped.concurrency) == ("poisson", 2.0, 8)
    opened = SCENARIOS["sweep"].adjusted(arrival="poisson", rate=3).points[0].arrival
    assert (opened.kind, opened.rate, opened.concurrency) == ("poisson", 3, None)
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS) and "--scale" in out


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--arrival", "poisson", "--rate", "-2"]) == 2
    assert "needs a finite rate > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--sweep", "1,x"])


def test_side_by_side_report_and_kernel_table(tmp_path):
    """The ratio table (faster = > 1 whichever way the figure points; the 1M row's two figures
    each get a ratio; rows served with other flags refuse to compare) and the decode profile's
    kernel table from a torch profiler trace (per step, by name and by kind)."""
    import gzip

    from loadtests import side_by_side as sbs

    for impl, slow in (("plugin", 1.0), ("intree", 1.25)):
        rows = {r: {"input_throughput": 1000 / slow, "output_throughput": 100 / slow, "server_tpot_ms": 4 * slow,
                    "median_ttft_ms": 900 * slow, "median_e2el_ms": 9000 * slow} for r in sbs.ROWS}
        rows.pop("decode-32k-c16")
        # a figure the summary did not keep yet is read from the row's own bench JSON
        del rows["1m-decode"]["median_e2el_ms"]
        (tmp_path / f"{impl}-1m-decode.json").write_text(json.dumps({"median_e2el_ms": 9000 * slow}))
        (tmp_path / f"summary-{impl}.json").write_text(json.dumps(
            {"impl": impl, "rows": rows, "serve_args": sbs.SERVE_ARGS, "scale": 1.0}))
    table = sbs.report(tmp_path)
    ratios = json.loads((tmp_path / "ratios.json").read_text())
    assert set(ratios) == {"prefill-8k", "prefill-32k", "prefill-128k", "1m", "1m-decode server_tpot_ms",
                           "1m-decode median_e2el_ms"} | {f"decode-32k-{c} {f}" for c in ("c1", "c64")
                                                          for f in ("output_throughput", "server_tpot_ms")}
    assert set(ratios.values()) == {1.25}
    assert "| decode-32k-c16 | output_throughput | None | None | not measured |" in table
    # profiled steps by kind, when both sides profiled the row
    for impl, kinds in (("plugin", {"moe": 900.0, "kda/conv": 300.0}), ("intree", {"moe": 1000.0, "attention": 50.0})):
        summary = json.loads((tmp_path / f"summary-{impl}.json").read_text())
        summary["profiles"] = {"decode-32k-c64": {"us_per_step": sum(kinds.values()), "by_kind_us_per_step": kinds}}
        (tmp_path / f"summary-{impl}.json").write_text(json.dumps(summary))
    profiled = sbs.report(tmp_path).split("| decode-32k-c64: profiled steps")[1].splitlines()
    assert profiled[2:] == ["| moe | 900.0 | 1,000.0 | -100.0 |", "| kda/conv | 300.0 | 0.0 | +300.0 |",
                            "| attention | 0.0 | 50.0 | -50.0 |", "| all kernels | 1,200.0 | 1,050.0 | +150.0 |"]
    for impl in ("plugin", "intree"):  # the rest of this test compares without them
        summary = json.loads((tmp_path / f"summary-{impl}.json").read_text())
        del summary["profiles"]
        (tmp_path / f"summary-{impl}.json").write_text(json.dumps(summary))
    # the profiler's flags do not count (idle until the profile after the rows): one side profiled
    plugin = json.loads((tmp_path / "summary-plugin.json").read_text())
    plugin["serve_args"] = sbs.SERVE_ARGS + sbs.profiler_args(tmp_path)
    (tmp_path / "summary-plugin.json").write_text(json.dumps(plugin))
    assert sbs.report(tmp_path) == table
    (tmp_path / "summary-intree.json").write_text(json.dumps(
        {"impl": "intree", "rows": {}, "serve_args": sbs.SERVE_ARGS + ["--enforce-eager"], "scale": 1.0}))
    with pytest.raises(SystemExit, match="not comparable"):
        sbs.report(tmp_path)
    # a row measured with other (input, output, prompts, concurrency) on one side gets no ratio
    for impl, spec in (("plugin", [8192, 1, 32, 1]), ("intree", [8192, 1, 8, 1])):
        (tmp_path / f"summary-{impl}.json").write_text(json.dumps({"impl": impl, "serve_args": sbs.SERVE_ARGS,
            "scale": 1.0, "rows": {"prefill-8k": {"input_throughput": 1000.0, "spec": spec}}}))
    assert "| prefill-8k | input_throughput | 1,000.00 | 1,000.00 | not comparable: " in sbs.report(tmp_path)
    assert json.loads((tmp_path / "ratios.json").read_text()) == {}

    trace = {"traceEvents": [
        {"cat": "kernel", "name": "_recurrent_kda_kernel", "dur": 6.0, "ts": 0.0},
        {"cat": "kernel", "name": "_recurrent_kda_kernel", "dur": 10.0, "ts": 100.0},
        {"cat": "kernel", "name": "nvjet_tst_128x64_gemm", "dur": 40.0, "ts": 4.0},  # overlaps
        {"cat": "kernel", "name": "fused_moe_kernel", "dur": 24.0, "ts": 60.0},
        {"cat": "kernel", "name": "void at::native::elementwise_kernel<copy>", "dur": 2.0, "ts": 198.0},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 500.0},  # not a GPU kernel: not counted
    ]}
    (tmp_path / "profile" / "w").mkdir(parents=True)
    with gzip.open(tmp_path / "profile" / "w" / "rank0.1.pt.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    k = sbs.kernel_table(tmp_path / "profile", steps=2)
    assert (k["category"], k["us_per_step"], k["launches_per_step"]) == ("kernel", 41.0, 2.5)
    # GPU timeline 0..200 us, kernels running during 0-44, 60-84, 100-110, 198-200: 80 of 200
    assert (k["gpu_span_us_per_step"], k["gpu_busy_fraction"]) == (100.0, 0.4)
    assert k["by_kind_us_per_step"] == {"gemm": 20.0, "moe": 12.0, "kda/conv": 8.0, "copy/fill": 1.0}
    assert k["top"][0] == {"name": "nvjet_tst_128x64_gemm", "us_per_step": 20.0, "calls_per_step": 0.5}
    # a trace with vLLM's once-a-step kernel is divided by the steps it holds, not those asked
    trace["traceEvents"] += [{"cat": "kernel", "name": sbs.STEP_MARKER_KERNEL, "dur": 1.0, "ts": 200.0 + i}
                             for i in range(4)]
    with gzip.open(tmp_path / "profile" / "w" / "rank0.1.pt.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    k = sbs.kernel_table(tmp_path / "profile", steps=2)
    assert (k["steps"], k["steps_asked"], k["us_per_step"], k["launches_per_step"]) == (4, 2, 21.5, round(9 / 4, 1))


def test_side_by_side_bench_records_how_the_output_streamed(tmp_path, monkeypatch):
    """A row keeps `vllm bench serve`'s per-request timelines (--save-detailed) and the number of
    stream chunks the median request's output came in: TPOT over 63 tokens that arrived in two
    chunks is not a decode-step figure, and the summary must show it. The prefix cache is reset
    before a row, but not before a row that decodes from its source row's cached prompt."""
    import types

    import requests

    from loadtests import side_by_side as sbs
    from vllm_kimi_linear.tools import harness

    posted = []
    monkeypatch.setattr(requests, "post", lambda url, **k: posted.append(url) or types.SimpleNamespace(
        raise_for_status=lambda: None))
    seen = {}

    def fake_bench(argv, log):
        seen["argv"] = argv
        name = argv[argv.index("--result-filename") + 1]
        (tmp_path / name).write_text(json.dumps({
            "completed": int(argv[argv.index("--num-prompts") + 1]), "failed": 0, "total_input_tokens": 300, "duration": 2.0,
            "median_tpot_ms": 5.0, "itls": [[0.1] * 63, [1.6, 1.7], [0.2] * 9]}))

    monkeypatch.setattr(sbs, "vllm_bench_serve", fake_bench)
    served = iter(range(0, 10**6, 100))  # /metrics: every reading has counted 100 more requests done
    monkeypatch.setattr(harness, "scrape", lambda base: {sbs.DONE: next(served)})
    monkeypatch.setitem(sbs.ROWS, "probe", (100, 64, 3, 1, ("median_tpot_ms",)))
    res = sbs.bench("http://x", tmp_path, "probe", tmp_path, "plugin", seed=1)
    assert "--save-detailed" in seen["argv"] and posted == ["http://x/reset_prefix_cache"]
    assert res["stream_chunks"] == 10 and res["input_throughput"] == 150.0 and res["spec"] == [100, 64, 3, 1]
    assert {"stream_chunks", "spec"} <= set(sbs.KEEP)
    posted.clear()
    sbs.bench("http://x", tmp_path, "1m-decode", tmp_path, "plugin", seed=sbs.row_seed("1m-decode"))
    assert posted == [] and sbs.row_seed("1m-decode") == sbs.row_seed("1m")
    assert seen["argv"][seen["argv"].index("--seed") + 1] == str(sbs.row_seed("1m"))


def test_side_by_side_server_timings_are_the_rows_own():
    """The server's figures are /metrics deltas over the row: earlier requests drop out, TPOT is
    decode time over decode steps (a request's first token is its prefill's), and a figure whose
    histogram did not move is None, not 0."""
    from loadtests import side_by_side as sbs

    before = {sbs.DONE: 10, "vllm:generation_tokens_total": 500, "vllm:request_decode_time_seconds_sum": 7.0,
              "vllm:time_to_first_token_seconds_sum": 3.0, "vllm:time_to_first_token_seconds_count": 10}
    # 4 requests of 33 tokens: 128 decode steps in 0.512 s; TTFTs summing to 2 s
    after = {sbs.DONE: 14, "vllm:generation_tokens_total": 632, "vllm:request_decode_time_seconds_sum": 7.512,
             "vllm:time_to_first_token_seconds_sum": 5.0, "vllm:time_to_first_token_seconds_count": 14}
    got = sbs.server_timings(before, after)
    assert got["server_requests"] == 4 and got["server_tpot_ms"] == pytest.approx(4.0)
    assert got["server_ttft_ms"] == pytest.approx(500.0) and got["server_prefill_ms"] is None
    one_token = dict(after, **{"vllm:generation_tokens_total": 504})  # 4 requests, 1 token each
    assert sbs.server_timings(before, one_token)["server_tpot_ms"] is None
    assert {"server_tpot_ms", "server_requests", *sbs.SERVER_MEANS} <= set(sbs.KEEP)


def test_side_by_side_same_prompts_row_must_follow_its_source(tmp_path, capsys):
    from loadtests import side_by_side as sbs

    for rows in ("1m-decode", "1m-decode,1m", "1m,prefill-8k,1m-decode"):
        with pytest.raises(SystemExit):
            sbs.main(["run", "--impl", "plugin", "--out", str(tmp_path), "--rows", rows])
        assert "list it right after 1m (--rows ...,1m,1m-decode)" in capsys.readouterr().err
    # a profiled rerun comes after every row, when another row's cached prompt is gone
    with pytest.raises(SystemExit):
        sbs.main(["run", "--impl", "plugin", "--out", str(tmp_path), "--rows", "1m,1m-decode", "--profile", "1m-decode"])
    assert "rows ['1m-decode'] decode from a prompt another row cached" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sbs.main(["run", "--impl", "plugin", "--out", str(tmp_path), "--profile", "decode-32k-c65"])
    assert "unknown rows ['decode-32k-c65']" in capsys.readouterr().err


def test_a_run_ended_by_sigterm_stops_its_servers(tmp_path):
    """`timeout` (and a device call's limit) ends a run with SIGTERM. The harness starts each server
    in its own process session, so unless the run turns SIGTERM into an orderly exit, the server
    outlives it (on the GPU machine one held the GPU into the next call)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vllm_kimi_linear.tools.harness import running_process, server_env\n"
        "cmd = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        f"with running_process(cmd, server_env(), Path({str(tmp_path / 'server.log')!r}), ready=lambda: True) as p:\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    server_pid = int(run.stdout.readline())
    os.killpg(server_pid, 0)  # the "server" runs, in its own process group
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(server_pid, signal.SIGKILL)
    pytest.fail("the server outlived the run that SIGTERM ended")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_exact_length_prompts_with_local_tokenizer(tiny_model):
    from loadtests.prompts import LocalTokenizer

    tok = LocalTokenizer(str(tiny_model))

    async def go():
        b = PromptBuilder(tok, seed=3)
        await b.setup()
        assert len(b.words) >= 8 and b.overhead > 0
        out = {}
        for target in (b.overhead + 8, 64, 1000, 6000):
            ps = [await b.build(target, i, key="k") for i in range(3)]
            out[target] = ps
        shared = [await b.build(3000, i, key="doc", prefix_tokens=2500) for i in range(4)]
        other = await b.build(3000, 0, key="doc2", prefix_tokens=2500)
        return b, out, shared, other

    b, out, shared, other = asyncio.run(go())
    for target, ps in out.items():
        for p in ps:
            ids = asyncio.run(tok.ids(p.messages))
            assert len(ids) == p.tokens == target
        assert len({p.messages[0]["content"] for p in ps}) == 3  # unique per request
    ids = [asyncio.run(tok.ids(p.messages)) for p in shared]
    assert all(len(x) == 3000 for x in ids)
    assert min(common_prefix(ids[0], x) for x in ids[1:]) == 2500  # exactly the shared prefix
    assert common_prefix(ids[0], asyncio.run(tok.ids(other.messages))) < 100  # another document
    with pytest.raises(ValueError, match="cannot hold a chat prompt"):
        asyncio.run(b.build(b.overhead, 0))


def test_prompt_builder_needs_one_token_words():
    class CharTokenizer:  # every character a token: no word is one token
        async def ids(self, messages):
            return list(range(len(messages[0]["content"]) + 5))

    with pytest.raises(RuntimeError, match="one token after a space"):
        asyncio.run(PromptBuilder(CharTokenizer()).setup())


def test_speedup_window_stats():
    def req(first, last, step=0.1):  # one token per `step` seconds from `first`
        n = round((last - first) / step)
        return {"chunks": [(first + k * step, k + 1) for k in range(n + 1)]}

    reqs = [req(0.0, 10.0), req(1.0, 6.0), req(1.0, 4.0), req(1.0, 4.0, step=0.05)]
    w = hybrid_speedup.window_stats(reqs[:3], 1.0, 4.0)
    assert w["tpot_ms"] == pytest.approx(100) and w["tokens_per_s"] == pytest.approx(30)
    assert w["mean_tokens_per_s"] == pytest.approx(30) and w["tokens"] == 90 and w["window_s"] == 3.0
    stalled = req(0.0, 5.0)  # 50 steps of 0.1 s, then one stall of 1 s before the last token
    stalled["chunks"][-1] = (6.0, stalled["chunks"][-1][1])
    w = hybrid_speedup.window_stats([stalled], 0.0, 6.0)
    assert w["tpot_ms"] == pytest.approx(100) and w["mean_tokens_per_s"] == pytest.approx(50 / 6)
    bursty = {"chunks": [(0.2 * (k // 2) + 0.001 * (k % 2), k + 1) for k in range(40)]}  # pairs, 0.1 s/token
    assert hybrid_speedup.window_stats([bursty], 0.0, 4.0)["tpot_ms"] == pytest.approx(100, rel=0.02)
    with pytest.raises(RuntimeError, match="no decode steps"):
        hybrid_speedup.window_stats(reqs, 20.0, 30.0)


def test_speedup_reads_the_servers_generated_token_counter():
    page = ("# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            'vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0\n'
            'vllm:generation_tokens_total{engine="1",model_name="m"} 6.0\n'
            'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9\n'
            'vllm:prompt_tokens_total{engine="0",model_name="m"} 99.0\n')
    assert hybrid_speedup.generation_tokens(page) == 1240.0
    with pytest.raises(RuntimeError, match="no vllm:generation_tokens_total"):
        hybrid_speedup.generation_tokens("vllm:prompt_tokens_total 3.0\n")


def test_plots_write_pngs(tmp_path):
    recs = [rec(i, ttft=0.1 + 0.01 * i, e2e=1 + 0.1 * i) for i in range(5)]
    for r in recs:
        r.chunk_times = [r.start + r.ttft + 0.1 * k for k in range(10)]
    points = []
    for c in (1, 2):
        points.append({"name": f"c{c}", "arrival": {"kind": "concurrency", "rate": None, "concurrency": c,
                                                    "label": f"concurrency {c}"},
                       "summary": summarize(recs, 2.0, SLO(ttft_ms=150)),
                       "requests": [r.to_json() for r in recs]})
    paths = [report.plot_point(p, tmp_path) for p in points] + [report.plot_sweep(points, tmp_path)]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    assert "c2" in report.table(points)


# ---------------------------------------------------------------------------------------------
# 2. Against a tiny-model server
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sbs_dir(tmp_path_factory):
    """The side-by-side's DIR for rows against `server`: its profiler writes under DIR/profile."""
    return tmp_path_factory.mktemp("sbs")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory, sbs_dir):
    from loadtests.side_by_side import profiler_args

    pytest.importorskip("openai")
    port = free_port()
    # dev mode: the /reset_prefix_cache route the side-by-side rows call; the profiler configured
    # as `side_by_side run --profile` does (idle until a profiled rerun arms it)
    env = server_env(KIMI_MODEL=str(tiny_model), KIMI_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="2",
                     VLLM_SERVER_DEV_MODE="1")
    base = f"http://127.0.0.1:{port}"
    cmd = [str(ROOT / "deploy" / "serve-cpu.sh"), "--served-model-name", SERVED, "--max-model-len", str(MAX_LEN),
           *profiler_args(sbs_dir)]
    with running_process(cmd, env, tmp_path_factory.mktemp("log") / "server.log", timeout=1200,
                        ready=lambda: requests.get(f"{base}/v1/models", timeout=2).status_code == 200):
        yield f"{base}/v1"


def run_cli(server, out: Path, *args) -> tuple[int, dict]:
    code = cli.main([*args, "--base-url", server, "--out", str(out), "--no-progress", "--request-timeout", "600"])
    return code, json.loads((out / "result.json").read_text())


def check_result(result: dict, out: Path):
    """0 errors, counts that add up, prompt lengths exact (usage), ordered percentiles, PNGs."""
    assert result["model"] == SERVED and result["max_model_len"] == MAX_LEN
    for pt in result["points"]:
        s, reqs = pt["summary"], pt["requests"]
        assert s["errors"] == {} and s["requests"] == {"total": pt["num_requests"], "completed": pt["num_requests"],
                                                        "failed": 0}
        assert len(reqs) == pt["num_requests"]
        by_class = {}
        for r in reqs:
            c = pt["classes"][r["cls"]]
            assert r["prompt_tokens"] == r["prompt_tokens_expected"] == c["input_tokens"]
            assert r["completion_tokens"] == c["output_tokens"]  # ignore_eos: exactly max_tokens
            # a streamed chunk per token, or fewer: a busy vLLM server puts several tokens in one
            # chunk (seen in CI: 17 chunks for 20 tokens next to 8K-token prefills)
            assert 1 <= len(r["chunk_times"]) <= r["completion_tokens"]
            assert 0 < r["ttft"] <= r["e2e"] and r["tpot"] > 0
            by_class[r["cls"]] = by_class.get(r["cls"], 0) + 1
        assert by_class == {k: v["requests"] for k, v in pt["classes"].items() if v["requests"]}
        for k, v in pt["classes"].items():
            if v["prefix_tokens"] and v["requests"] > 1:
                assert v["shared_prefix_tokens"] == v["prefix_tokens"]
        assert s["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in reqs)
        assert s["tokens"]["completion"] == sum(r["completion_tokens"] for r in reqs)
        assert s["throughput"]["output_tokens_per_s"] * s["duration_s"] == pytest.approx(s["tokens"]["completion"])
        assert s["duration_s"] >= max(r["start"] + r["e2e"] for r in reqs) - 0.01
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = s[key]
            assert d["count"] > 0 and d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], (key, d)
        assert s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
        assert 0 <= s["goodput"]["fraction"] <= 1
        assert (out / f"{pt['name']}.png").read_bytes()[:8] == PNG
    assert set(result["files"]) == {p.name for p in out.glob("*.png")}


@pytest.mark.parametrize("scenario,args", [
    ("1m-context", ["--scale", "0.008", "--num-requests", "2"]),                 # 8,000-token prompts
    ("mixed", ["--scale", "0.03", "--num-requests", "9"]),                       # 64, 983 and 7,864
    ("prefix-sharing", ["--scale", "0.08", "--num-requests", "4"]),              # 7,864 of 8,192 shared
    ("sweep", ["--scale", "0.008", "--sweep", "1,2", "--num-requests", "3"]),
])
def test_scenario_smoke(server, tmp_path, scenario, args):
    code, result = run_cli(server, tmp_path, scenario, *args)
    assert code == 0
    assert result["scenario"] == scenario and "tensor parallel 8" in result["hardware"]
    check_result(result, tmp_path)
    if scenario == "mixed":
        assert set(result["points"][0]["classes"]) == {"chat", "rag", "long-doc"}
        assert all(c["requests"] for c in result["points"][0]["classes"].values())
    if scenario == "sweep":
        assert [p["arrival"]["concurrency"] for p in result["points"]] == [1, 2]
        assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG


def test_custom_workload_time_bound(server, tmp_path):
    """A constant 1 req/s for at most 2.5 s sends 3 of the 20 requests (t = 0, 1, 2)."""
    code, result = run_cli(server, tmp_path, "--input-tokens", "100", "--output-tokens", "8",
                           "--arrival", "constant", "--rate", "1", "--num-requests", "20", "--max-duration", "2.5",
                           "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000")
    assert code == 0
    pt = result["points"][0]
    assert pt["summary"]["requests"]["total"] == 3 and pt["summary"]["goodput"]["fraction"] == 1.0
    assert [r["start"] for r in pt["requests"]] == pytest.approx([0, 1, 2], abs=0.3)


def test_errors_are_reported_by_type(server, tmp_path, tiny_model):
    """Unknown model name (counted with the local tokenizer): every request fails, by type."""
    code, result = run_cli(server, tmp_path, "--model", "no-such-model", "--tokenizer", str(tiny_model),
                           "--input-tokens", "50", "--output-tokens", "4", "--concurrency", "2",
                           "--num-requests", "3")
    assert code == 1
    s = result["points"][0]["summary"]
    assert s["requests"]["failed"] == 3 and list(s["errors"]) == ["HTTP 404"]
    assert s["goodput"]["good_requests"] == 0


def test_side_by_side_rows_through_vllm_bench_serve_in_process(server, tmp_path, tiny_model, monkeypatch):
    """Two rows through vLLM's own `vllm bench serve`, run in this process, against a real
    server: the saved JSON's counts and the row's spec; the second, a same-prompts row, is served
    from the prefix cache the first filled (vLLM's prefix-cache hit counter moves by most of its
    prompt: in "align" mode the KDA state is cached where a prefill chunk ends, every 2,048 tokens
    of this server's steps, so the prompt is longer than one step)."""
    from loadtests import side_by_side as sbs
    from vllm_kimi_linear.tools.harness import scrape

    monkeypatch.setattr(sbs, "SERVED", SERVED)
    monkeypatch.setitem(sbs.ROWS, "probe", (5000, 1, 2, 1, ("input_throughput",)))
    monkeypatch.setitem(sbs.ROWS, "probe-decode", (5000, 6, 1, 1, ("median_tpot_ms",)))
    monkeypatch.setitem(sbs.SAME_PROMPTS, "probe-decode", "probe")
    base = server.removesuffix("/v1")
    first = sbs.bench(base, tiny_model, "probe", tmp_path, "plugin", seed=sbs.row_seed("probe"))
    assert (first["completed"], first["total_input_tokens"], first["spec"]) == (2, 10000, [5000, 1, 2, 1])
    assert first["input_throughput"] > 0 and (tmp_path / "plugin-probe.json").exists()
    hits = scrape(base).get("vllm:prefix_cache_hits_total", 0.0)
    second = sbs.bench(base, tiny_model, "probe-decode", tmp_path, "plugin", seed=sbs.row_seed("probe-decode"))
    assert second["completed"] == 1 and second["median_tpot_ms"] > 0
    assert scrape(base)["vllm:prefix_cache_hits_total"] - hits >= 4096
    # the server's timings, counted over each row's own requests (the server has served others)
    assert first["server_requests"] == 2 and second["server_requests"] == 1
    assert first["server_tpot_ms"] is None and second["server_tpot_ms"] > 0  # 1 token: no decode step
    for row in (first, second):  # the server times a request from its arrival, the client from its send
        assert 0 < row["server_ttft_ms"] <= row["mean_ttft_ms"] + 1
        assert 0 < row["server_prefill_ms"] <= row["server_e2e_ms"] <= row["duration"] * 1000 + 1


def test_side_by_side_profiled_rerun_records_the_steps_asked(server, sbs_dir, tiny_model, monkeypatch):
    """A profiled rerun arms vLLM's profiler before the row (/start_profile with delay_iterations
    and max_iterations): the engine starts it at the row's PROFILE_FROM_STEP-th step and stops it
    PROFILE_STEPS steps later, so nothing on this side races the requests. On this CPU the table is
    of CPU ops, per recorded step; the traces move beside it and the rerun's figures stay apart
    from the summary's rows."""
    from loadtests import side_by_side as sbs

    monkeypatch.setattr(sbs, "SERVED", SERVED)
    monkeypatch.setitem(sbs.ROWS, "probe-mixed", (600, 24, 3, 3, ("output_throughput",)))  # ~25 steps
    monkeypatch.setitem(sbs.PROFILE_FROM_STEP, "probe-mixed", 4)
    monkeypatch.setattr(sbs, "PROFILE_STEPS", 3)
    base = server.removesuffix("/v1")
    got = sbs.profile_row(base, tiny_model, sbs_dir, "plugin", "probe-mixed")
    table = json.loads((sbs_dir / "profile-plugin-probe-mixed.json").read_text())
    assert "empty" not in got and got["steps"] == 3 and got["launches_per_step"] > 0, got
    assert (table["row"], table["from_step"], table["category"]) == ("probe-mixed", 4, "cpu_op")
    assert table["rerun"]["completed"] == 3 and table["rerun"]["spec"] == [600, 24, 3, 3]
    # the window is the 3 steps asked, not the row's ~25: each step runs every MLA layer once
    mla_layers = len(json.loads((tiny_model / "config.json").read_text())["linear_attn_config"]["full_attn_layers"])
    mla = [t for t in table["top"] if t["name"] == "vllm::unified_mla_attention_with_output"]
    assert mla and mla[0]["calls_per_step"] == mla_layers, table["top"][:8]
    assert list((sbs_dir / "traces-probe-mixed").glob("*.pt.trace.json*"))
    assert not list((sbs_dir / "profile").rglob("*.pt.trace.json*"))  # moved, for the next profile


def test_too_long_for_the_server_is_one_clear_error(server):
    with pytest.raises(SystemExit, match="needs 1,008,192 tokens .* max_model_len=10,000; use --scale"):
        cli.main(["1m-context", "--base-url", server, "--no-progress"])
