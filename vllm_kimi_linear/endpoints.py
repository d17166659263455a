"""HTTP side of the state manager: the `vllm.endpoint_plugins` entry point.

Adds to vLLM's OpenAI server
* `GET /kimi-linear/state`: the hybrid state layout and live usage (JSON), read from the
  engine core through its utility call `kimi_linear_state` (vllm_kimi_linear.state_manager);
* gauges on vLLM's Prometheus `/metrics`, refreshed from the engine core on every scrape, so a
  scrape after the last request ends shows exactly what is still held:
  kimi_linear_kda_slots_in_use, kimi_linear_mla_blocks_in_use, kimi_linear_blocks_free,
  kimi_linear_blocks_cached, kimi_linear_blocks_total, kimi_linear_prefix_hit_rate.
vLLM loads endpoint plugins only when VLLM_PLUGINS names them; `deploy/serve-cpu.sh` and the
deploy manifests set VLLM_PLUGINS=kimi_linear (that one name enables the model and this route).
Also owns `guard_inference_routes()`, which register() calls in every process: with --api-key,
vLLM checks the key only under /v1, /v2, /inference and /cohere; the plugin adds the other routes
that run the model or the tokenizer.
"""
from __future__ import annotations

import asyncio

GAUGES = {
    "kda_slots_in_use": "KDA state slots (KDA-group blocks) held by requests",
    "mla_blocks_in_use": "MLA latent KV blocks held by requests",
    "blocks_free": "free blocks in the pool KDA slots and MLA blocks share (cached ones included)",
    "blocks_cached": "free blocks that still hold a reusable prefix",
    "blocks_total": "blocks in the shared pool",
    "prefix_hit_rate": "prompt tokens found in the prefix cache / tokens looked up, since start",
}
REFRESH_TIMEOUT_S = 5.0
# Routes that run the model or expose the tokenizer outside vLLM's guarded prefixes (/v1, /v2,
# /inference, /cohere): with --api-key they would answer anyone. Probes stay open (/health,
# /ping, /load, /metrics, /version, /kimi-linear/state).
UNGUARDED_INFERENCE_ROUTES = ("/invocations", "/generative_scoring", "/tokenize", "/detokenize",
                              "/scale_elastic_ep", "/is_scaling_elastic_ep")


def guard_inference_routes() -> None:
    """Make vLLM's --api-key check cover UNGUARDED_INFERENCE_ROUTES too (its middleware reads the
    prefix tuple at each request)."""
    from vllm.entrypoints.serve.middleware import authenticate
    missing = tuple(r for r in UNGUARDED_INFERENCE_ROUTES if r not in authenticate.GUARDED_PREFIX)
    authenticate.GUARDED_PREFIX = authenticate.GUARDED_PREFIX + missing


class StateCollector:
    """A Prometheus collector over the last state read from the engine core."""

    def __init__(self):
        self.values: dict[str, float] = {}

    def update(self, state: dict) -> None:
        u, layout = state["usage"], state.get("layout") or {}
        self.values = {k: float(u[k]) for k in GAUGES if k in u}
        if "num_blocks" in layout:
            self.values["blocks_total"] = float(layout["num_blocks"])

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        for key, doc in GAUGES.items():
            if key in self.values:
                g = GaugeMetricFamily(f"kimi_linear_{key}", doc)
                g.add_metric([], self.values[key])
                yield g


class KimiLinearEndpoints:
    name = "kimi_linear"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine_client = None
        self.collector = StateCollector()
        self._registered = False

    async def read_state(self) -> dict:
        if self.engine_client is None:
            raise RuntimeError("no engine behind this server")
        return await asyncio.wait_for(
            self.engine_client.engine_core.call_utility_async("kimi_linear_state"),
            REFRESH_TIMEOUT_S)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get("/kimi-linear/state")
        async def kimi_linear_state():
            try:
                return await self.read_state()
            except Exception as e:  # the engine is busy or gone: say so, do not 500
                return JSONResponse(status_code=503, content={
                    "error": f"could not read the Kimi Linear state from the engine: {e!r}; "
                             "retry, or check /health"})

        app.include_router(router)

        @app.middleware("http")
        async def refresh_state_gauges(request, call_next):
            if request.url.path.rstrip("/") == "/metrics" and self.engine_client is not None:
                try:
                    self.collector.update(await self.read_state())
                except Exception:
                    self.collector.values = {}  # stale numbers would lie: leave them out
            return await call_next(request)

        if not self._registered:
            from prometheus_client import REGISTRY
            REGISTRY.register(self.collector)
            self._registered = True

    async def init_state(self, engine_client, state, args) -> None:
        self.engine_client = engine_client
