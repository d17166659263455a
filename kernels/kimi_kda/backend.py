"""Which implementation of an operator runs: "triton" on CUDA, "torch" elsewhere, unless the
call (`backend=`) or an environment variable names one."""
from __future__ import annotations

import os

import torch


def resolve_backend(device: torch.device, backend: str | None, env: str, choices: tuple[str, ...],
                    what: str) -> str:
    backend = backend or os.environ.get(env) or None
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in choices:
        raise ValueError(f"unknown {what} backend {backend!r}: choose one of {choices}")
    return backend
