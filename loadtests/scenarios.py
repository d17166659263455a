"""Named scenarios: what each sends, the hardware and `vllm serve` flags it is sized for, and its
SLOs. `--scale` shrinks token lengths for a CPU (0.008: a 1M-token prompt becomes 8000 tokens)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .metrics import SLO
from .workload import Arrival, RequestClass, Workload

MODEL = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
NODE = ("one node of 8 x H200 141 GB or 8 x H100 80 GB, tensor parallel 8 (capacity planner: "
        "14 resp. 7 concurrent 1,048,576-token requests)")
SERVE = (f"vllm serve {MODEL} --served-model-name kimi-linear --tensor-parallel-size 8 "
         "--max-model-len 1048576 --gpu-memory-utilization 0.92 --max-num-seqs 216 "
         "--max-num-batched-tokens 8192")


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    hardware: str
    serve: str
    points: tuple[Workload, ...]
    slo: SLO = SLO()

    def __post_init__(self):
        if not self.points:
            raise ValueError(f"scenario {self.name!r} has no points")
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario {self.name!r}: point names repeat: {names}")

    def adjusted(self, scale: float = 1.0, num_requests: int | None = None, max_duration_s: float | None = None,
                 sweep: list[float] | None = None, arrival: str | None = None, rate: float | None = None,
                 concurrency: int | None = None, seed: int | None = None, slo: SLO | None = None) -> "Scenario":
        """The scenario with command-line overrides applied. `sweep` replaces the points by copies
        of the first one at each value (a rate, or a concurrency for the closed loop)."""
        points = list(self.points)
        if arrival is not None or rate is not None or concurrency is not None:
            points = [replace(p, arrival=_override(p.arrival, arrival, rate, concurrency)) for p in points]
        if sweep:
            first = points[0]
            unit = "c" if first.arrival.kind == "concurrency" else "r"
            points = [replace(first, name=f"{unit}{v:g}", arrival=first.arrival.with_value(v)) for v in sweep]
        out = []
        for p in points:
            p = p.scaled(scale)
            if num_requests is not None:
                p = replace(p, num_requests=num_requests)
            if max_duration_s is not None:
                p = replace(p, max_duration_s=max_duration_s)
            if seed is not None:
                p = replace(p, seed=seed, arrival=replace(p.arrival, seed=seed))
            out.append(p)
        return replace(self, points=tuple(out), slo=slo or self.slo)

    def describe(self) -> str:
        slo = [("TTFT", self.slo.ttft_ms), ("TPOT", self.slo.tpot_ms), ("E2E", self.slo.e2e_ms)]
        lines = [f"{self.name}: {self.summary}", f"  hardware: {self.hardware}", f"  serve:    {self.serve}",
                 "  SLO:      " + (", ".join(f"{k} {v:g} ms" for k, v in slo if v) or "none")]
        for p in self.points:
            cls = "; ".join(f"{c.name} {c.input_tokens:,} in / {c.output_tokens:,} out"
                            + (f", {c.prefix_tokens:,} shared" if c.prefix_tokens else "")
                            + (f", weight {c.weight:g}" if len(p.classes) > 1 else "") for c in p.classes)
            bound = f", stop sending after {p.max_duration_s:g} s" if p.max_duration_s else ""
            lines.append(f"  point {p.name}: {p.num_requests} requests, {p.arrival.label}{bound}: {cls}")
        return "\n".join(lines)


def _override(a: Arrival, kind: str | None, rate: float | None, concurrency: int | None) -> Arrival:
    """`a` with what the command line gives; a closed loop's worker count is not carried over as
    a cap when the kind changes to a rate."""
    kind = kind or a.kind
    if kind == "concurrency":
        return Arrival(kind, None, concurrency or a.concurrency or 1, a.seed)
    cap = concurrency if concurrency is not None else (a.concurrency if a.kind == kind else None)
    return Arrival(kind, rate if rate is not None else (a.rate or 1.0), cap, a.seed)


def _one_m() -> Scenario:
    # 1,000,000 prompt + 8,192 output <= 1,048,576; 4 at once fits 8 x H100 (7) and 8 x H200 (14)
    c = RequestClass("1m", input_tokens=1_000_000, output_tokens=8192)
    return Scenario(
        "1m-context", "a few 1M-token requests at once, decode-heavy: KDA's fixed state vs the MLA "
        "latent cache at full context", NODE, SERVE,
        (Workload("1m", (c,), Arrival("concurrency", concurrency=4), num_requests=4, max_duration_s=3600),),
        SLO(ttft_ms=600_000, tpot_ms=100))


def _mixed() -> Scenario:
    classes = (RequestClass("chat", 2048, 256, weight=0.70),
               RequestClass("rag", 32768, 512, weight=0.25),
               RequestClass("long-doc", 262144, 1024, weight=0.05))
    return Scenario(
        "mixed", "Poisson arrivals of chat (2K), RAG (32K) and long-document (256K) requests, 70/25/5",
        NODE, SERVE,
        (Workload("mixed", classes, Arrival("poisson", rate=2.0), num_requests=600, max_duration_s=900),),
        SLO(ttft_ms=10_000, tpot_ms=50))


def _prefix() -> Scenario:
    classes = (RequestClass("doc-a", 102_400, 256, prefix_tokens=98_304),
               RequestClass("doc-b", 102_400, 256, prefix_tokens=98_304))
    return Scenario(
        "prefix-sharing", "two 96K-token documents, each shared by half of the requests, with 4K "
        "unique tokens per request (meant for --enable-prefix-caching; correct either way)",
        NODE, SERVE + " --enable-prefix-caching",
        (Workload("prefix", classes, Arrival("concurrency", concurrency=16), num_requests=64, max_duration_s=1800),),
        SLO(ttft_ms=5_000, tpot_ms=50))


def _sweep() -> Scenario:
    c = RequestClass("8k", 8192, 1024)
    base = Workload("c1", (c,), Arrival("concurrency", concurrency=1), num_requests=16, max_duration_s=600)
    points = tuple(replace(base, name=f"c{n}", arrival=base.arrival.with_value(n), num_requests=max(16, 4 * n))
                   for n in (1, 2, 4, 8, 16, 32, 64, 128))
    return Scenario(
        "sweep", "closed-loop concurrency 1..128 of 8K-in / 1K-out requests: throughput vs latency",
        NODE, SERVE, points, SLO(ttft_ms=2_000, tpot_ms=50))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (_one_m(), _mixed(), _prefix(), _sweep())}


def custom(input_tokens: int, output_tokens: int, prefix_tokens: int, arrival: Arrival,
           num_requests: int, max_duration_s: float | None) -> Scenario:
    c = RequestClass("custom", input_tokens, output_tokens, prefix_tokens=prefix_tokens)
    return Scenario("custom", "workload from the command line", "any", "any",
                    (Workload("custom", (c,), arrival, num_requests, max_duration_s),))
