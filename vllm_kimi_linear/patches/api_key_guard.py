"""vllm.entrypoints.serve.middleware.authenticate.GUARDED_PREFIX (every model; a security fix).

With --api-key, vLLM checks the key only under /v1, /v2, /inference and /cohere; the routes below
run the model or expose the tokenizer outside them and would answer anyone. Probes stay open
(/health, /ping, /load, /metrics, /version, /kimi-linear/state).
"""
from __future__ import annotations

UNGUARDED_INFERENCE_ROUTES = ("/invocations", "/generative_scoring", "/tokenize", "/detokenize",
                              "/scale_elastic_ep", "/is_scaling_elastic_ep")


def install() -> None:
    """Make vLLM's --api-key check cover UNGUARDED_INFERENCE_ROUTES too (its middleware reads the
    prefix tuple at each request)."""
    from vllm.entrypoints.serve.middleware import authenticate

    from . import written_for
    written_for(__name__)
    missing = tuple(r for r in UNGUARDED_INFERENCE_ROUTES if r not in authenticate.GUARDED_PREFIX)
    authenticate.GUARDED_PREFIX = authenticate.GUARDED_PREFIX + missing
