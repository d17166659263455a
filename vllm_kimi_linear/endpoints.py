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
Also owns `RejectInvalidUnicode`: request bodies holding text that is not Unicode (lone
surrogates) get a 400 naming the field. (The --api-key guard on more routes: patches/.)
"""
from __future__ import annotations

import asyncio
import json

GAUGES = {
    "kda_slots_in_use": "KDA state slots (KDA-group blocks) held by requests",
    "mla_blocks_in_use": "MLA latent KV blocks held by requests",
    "blocks_free": "free blocks in the pool KDA slots and MLA blocks share (cached ones included)",
    "blocks_cached": "free blocks that still hold a reusable prefix",
    "blocks_total": "blocks in the shared pool",
    "prefix_hit_rate": "prompt tokens found in the prefix cache / tokens looked up, since start",
}
REFRESH_TIMEOUT_S = 5.0
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


TEXT_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations")


def _first_lone_surrogate(value, where: str = ""):
    """(path, text) of the first string in a JSON value that is not valid Unicode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body", value
    elif isinstance(value, dict):
        for k, v in value.items():
            if (hit := _first_lone_surrogate(v, f"{where}.{k}" if where else k)):
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (hit := _first_lone_surrogate(v, f"{where}[{i}]")):
                return hit
    return None


class RejectInvalidUnicode:
    """Pure ASGI middleware: a JSON request body whose strings hold a lone UTF-16 surrogate (valid
    JSON, "\\ud800", but not text) gets a 400 naming the field, instead of the tokenizer's
    internal "TextEncodeInput must be Union[...]". Other bodies pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope["path"].rstrip("/") not in TEXT_ROUTES:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # disconnect: let vLLM see it
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        hit = None
        if b"\\u" in body:  # only escaped surrogates can survive a UTF-8 body
            try:
                hit = _first_lone_surrogate(json.loads(body))
            except ValueError:
                pass  # not JSON: vLLM answers that itself
        if hit is not None:
            from starlette.responses import JSONResponse
            field, text = hit
            bad = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
            msg = (f"{field} contains a lone UTF-16 surrogate (U+{ord(bad):04X}), which is not "
                   "valid Unicode text: send well-formed UTF-8 / paired surrogates")
            return await JSONResponse(status_code=400, content={"error": {
                "message": msg, "type": "BadRequestError", "param": field, "code": 400}})(
                scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


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

        app.add_middleware(RejectInvalidUnicode)

        if not self._registered:
            from prometheus_client import REGISTRY
            REGISTRY.register(self.collector)
            self._registered = True

    async def init_state(self, engine_client, state, args) -> None:
        self.engine_client = engine_client
