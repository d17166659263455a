"""Per-request records and their summary: percentiles, throughput, goodput against SLOs, errors.

Pure Python (no numpy, no server): the unit tests exercise it directly.

Definitions (the same as vLLM's own serving benchmark):
  TTFT  first streamed chunk with a choice, from the moment the request was sent;
  TPOT  (e2e - ttft) / (completion_tokens - 1), per request;
  ITL   gaps between successive content-bearing chunks, all requests pooled;
  E2E   request sent -> stream closed.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start` is relative to the run's start."""

    index: int
    cls: str
    start: float
    prompt_tokens_expected: int
    prompt_tokens: int = 0  # from usage
    completion_tokens: int = 0  # from usage
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # content chunks, relative to run start
    error: str | None = None  # the exception's type name (or "HTTP 400" ...)
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def to_json(self, with_times: bool = True) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not with_times:
            d.pop("chunk_times")
            d.pop("itl")
        return d


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None means "not checked"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self):
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of milliseconds, got {v!r}")

    def met(self, r: RequestRecord) -> bool:
        """A request is good if it succeeded and meets every SLO that is set. TPOT of a
        one-token answer is undefined and does not fail the TPOT objective."""
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1e3 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and r.tpot is not None and r.tpot * 1e3 > self.tpot_ms:
            return False
        if self.e2e_ms is not None and (r.e2e is None or r.e2e * 1e3 > self.e2e_ms):
            return False
        return True


def percentile(values, p: float) -> float | None:
    """Linear-interpolation percentile (numpy's default method); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values, scale: float = 1e3) -> dict:
    """mean and p50/p90/p99 (and min/max) of `values` times `scale` (seconds -> ms)."""
    xs = [v * scale for v in values if v is not None]
    out = {"count": len(xs), "mean": sum(xs) / len(xs) if xs else None,
           "min": min(xs) if xs else None, "max": max(xs) if xs else None}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(xs, p)
    return out


def goodput(records: list[RequestRecord], slo: SLO, duration: float) -> dict:
    good = sum(slo.met(r) for r in records)
    return {"good_requests": good, "fraction": good / len(records) if records else 0.0,
            "requests_per_s": good / duration if duration > 0 else 0.0}


def summarize(records: list[RequestRecord], duration: float, slo: SLO) -> dict:
    """The run's numbers: counts, latency distributions (ms), throughput, goodput, errors."""
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    completion = sum(r.completion_tokens for r in ok)
    return {
        "requests": {"total": len(records), "completed": len(ok), "failed": len(records) - len(ok)},
        "duration_s": duration,
        "tokens": {"prompt": prompt, "completion": completion},
        "throughput": {
            "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
            "output_tokens_per_s": completion / duration if duration > 0 else 0.0,
            "total_tokens_per_s": (prompt + completion) / duration if duration > 0 else 0.0,
        },
        "ttft_ms": distribution(r.ttft for r in ok),
        "tpot_ms": distribution(r.tpot for r in ok),
        "itl_ms": distribution(x for r in ok for x in r.itl),
        "e2e_ms": distribution(r.e2e for r in ok),
        "slo": asdict(slo),
        "goodput": goodput(records, slo, duration),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
    }
