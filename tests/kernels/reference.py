"""fla-core's naive KDA references, run in true float64.

`fla.ops.kda.naive` casts its inputs with `.to(torch.float)`, i.e. float32, whatever they came in
as. For a float64 reference we run the same function objects with a `torch` whose `float` is
float64; nothing else in their code changes. `fla.ops.kda.gate.naive_kda_gate` casts with the
tensor method `.float()` instead: `naive_kda_gate64` runs it on tensors whose `.float()` keeps
float64.
"""
from __future__ import annotations

import types

import torch


class _Torch64(types.ModuleType):
    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def float64(fn):
    """Return `fn` (a plain function) with `torch.float` meaning float64 inside it."""
    glb = dict(fn.__globals__)
    glb["torch"] = _Torch64("torch")
    return types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)


def naive_references():
    """(naive_recurrent_kda, naive_chunk_kda, naive_kda_gate) from fla-core, in float64."""
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
    return float64(naive_recurrent_kda), float64(naive_chunk_kda), naive_kda_gate


class _Keep64(torch.Tensor):
    """A float64 tensor whose `.float()` is itself (ops on it stay _Keep64: torch's default)."""

    def float(self, *args, **kwargs):
        return self


def naive_kda_gate64(f, A_log, dt_bias=None):
    """fla-core's `naive_kda_gate` (g = -exp(A_log) * softplus(f + dt_bias)) run in float64."""
    from fla.ops.kda.gate import naive_kda_gate
    keep = lambda t: None if t is None else t.double().as_subclass(_Keep64)  # noqa: E731
    out = naive_kda_gate(keep(f), keep(A_log), keep(dt_bias), output_dtype=torch.float64)
    return out.as_subclass(torch.Tensor)
