"""Request helpers of the reliability tests (tests/test_reliability_*.py). The server they run
against, its gauges and memory come from the shared harness, vllm_kimi_linear/tools/harness.py."""
from __future__ import annotations

import pytest
import requests

from vllm_kimi_linear.tools.harness import SERVED_NAME, serve_tiny


def server_fixture(**serve_kwargs):
    """A module-scoped `server` fixture: the session's tiny model behind the README's serve
    command (`serve_tiny(**serve_kwargs)`), shared by the module's tests."""
    @pytest.fixture(scope="module")
    def server(tmp_path_factory, tiny_model_dir):
        with serve_tiny(tmp_path_factory.mktemp("server"), model_dir=tiny_model_dir, **serve_kwargs) as s:
            yield s
    return server


def chat_body(content: str, max_tokens: int, **kw) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **kw}


def error_message(resp: requests.Response) -> str:
    """The human-readable message of an error response: OpenAI style {"error": {"message"}},
    FastAPI's {"detail"}, or the auth middleware's {"error": "..."}; '' if none."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or "")
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return ""
