"""What a load-test point sends: request classes (exact token lengths, optional shared prefix), an
arrival process, and bounds in requests and time. Frozen dataclasses that validate themselves."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

ARRIVALS = ("constant", "poisson", "concurrency")


@dataclass(frozen=True)
class RequestClass:
    """One kind of request. `input_tokens` counts the whole chat prompt (template included);
    the first `prefix_tokens` of it are the same for every request of the class (0: none)."""

    name: str
    input_tokens: int
    output_tokens: int
    weight: float = 1.0
    prefix_tokens: int = 0

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a request class needs a non-empty name")
        if not isinstance(self.input_tokens, int) or self.input_tokens < 1:
            raise ValueError(f"class {self.name!r}: input_tokens must be a positive int, got {self.input_tokens!r}")
        if not isinstance(self.output_tokens, int) or self.output_tokens < 1:
            raise ValueError(f"class {self.name!r}: output_tokens must be a positive int, got {self.output_tokens!r}")
        if not self.weight > 0:
            raise ValueError(f"class {self.name!r}: weight must be > 0, got {self.weight!r}")
        if not isinstance(self.prefix_tokens, int) or not 0 <= self.prefix_tokens < self.input_tokens:
            raise ValueError(f"class {self.name!r}: prefix_tokens must be in [0, input_tokens="
                             f"{self.input_tokens}), got {self.prefix_tokens!r}")

    def scaled(self, scale: float, min_input: int = 64, min_output: int = 8, min_suffix: int = 16) -> "RequestClass":
        """Token lengths times `scale` (1M tokens at 0.008 -> 8000), kept above small floors so a
        prompt still holds its chat template and a unique part after any shared prefix."""
        prefix = round(self.prefix_tokens * scale) if self.prefix_tokens else 0
        suffix = max(min_suffix, round((self.input_tokens - self.prefix_tokens) * scale))
        return replace(self, input_tokens=max(min_input, prefix + suffix),
                       output_tokens=max(min_output, round(self.output_tokens * scale)),
                       prefix_tokens=prefix)


@dataclass(frozen=True)
class Arrival:
    """When requests are sent.

    constant     one request every 1/rate seconds;
    poisson      exponential gaps with mean 1/rate (seeded);
    concurrency  closed loop: `concurrency` workers, each sends its next request when the last ends.
    For the two rate kinds, `concurrency` (optional) caps the requests in flight.
    """

    kind: str
    rate: float | None = None
    concurrency: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ARRIVALS:
            raise ValueError(f"arrival kind must be one of {ARRIVALS}, got {self.kind!r}")
        if self.kind == "concurrency":
            if not isinstance(self.concurrency, int) or self.concurrency < 1:
                raise ValueError(f"arrival 'concurrency' needs concurrency >= 1, got {self.concurrency!r}")
            if self.rate is not None:
                raise ValueError("arrival 'concurrency' takes no rate "
                                 "(use 'constant' or 'poisson' with a concurrency cap)")
        else:
            ok = isinstance(self.rate, (int, float)) and self.rate > 0 and math.isfinite(self.rate)
            if not ok:
                raise ValueError(f"arrival {self.kind!r} needs a finite rate > 0 (requests/s), got {self.rate!r}")
            if self.concurrency is not None and (not isinstance(self.concurrency, int) or self.concurrency < 1):
                raise ValueError(f"concurrency cap must be an int >= 1, got {self.concurrency!r}")

    def offsets(self, n: int) -> list[float] | None:
        """Send times (seconds from the start) of n requests; None for the closed loop."""
        if self.kind == "concurrency":
            return None
        if self.kind == "constant":
            return [i / self.rate for i in range(n)]
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(self.rate)
        return out

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency}"
        cap = f", max {self.concurrency} in flight" if self.concurrency else ""
        return f"{self.kind} {self.rate:g} req/s{cap}"

    def with_value(self, value: float) -> "Arrival":
        """The same process at another load: rate for rate kinds, concurrency for the closed loop."""
        if self.kind == "concurrency":
            if value != int(value):
                raise ValueError(f"a concurrency must be a whole number, got {value}")
            return replace(self, concurrency=int(value))
        return replace(self, rate=float(value))


@dataclass(frozen=True)
class Workload:
    """One measured point: which requests, how they arrive, at most `num_requests` of them and
    no new one after `max_duration_s` (requests in flight then are waited for)."""

    name: str
    classes: tuple[RequestClass, ...]
    arrival: Arrival
    num_requests: int
    max_duration_s: float | None = None
    seed: int = 0
    ignore_eos: bool = True  # vLLM extension: every request decodes exactly output_tokens
    temperature: float = 0.0
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"workload name must be non-empty without '/', '\\' or spaces, got {self.name!r}")
        if not self.classes:
            raise ValueError(f"workload {self.name!r} has no request classes")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"workload {self.name!r}: request class names repeat: {names}")
        if not isinstance(self.num_requests, int) or self.num_requests < 1:
            raise ValueError(f"workload {self.name!r}: num_requests must be an int >= 1, got {self.num_requests!r}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"workload {self.name!r}: max_duration_s must be > 0, got {self.max_duration_s!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"workload {self.name!r}: temperature must be in [0, 2], got {self.temperature!r}")

    def class_sequence(self) -> list[RequestClass]:
        """Which class each request is: smooth weighted round robin, so any prefix of the run has
        the mix of the weights (no sampling noise in short runs) and classes interleave."""
        total = sum(c.weight for c in self.classes)
        credit = [0.0] * len(self.classes)
        out = []
        for _ in range(self.num_requests):
            for k, c in enumerate(self.classes):
                credit[k] += c.weight
            best = max(range(len(credit)), key=lambda k: credit[k])
            credit[best] -= total
            out.append(self.classes[best])
        return out

    def scaled(self, scale: float) -> "Workload":
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        if scale == 1:
            return self
        return replace(self, classes=tuple(c.scaled(scale) for c in self.classes))

    @property
    def max_tokens_per_request(self) -> int:
        return max(c.input_tokens + c.output_tokens for c in self.classes)
