"""A checkpoint against its config: every tensor the config implies, with its shape and dtype.

Run twice: by the config hook at start-up on a local checkpoint's safetensors headers (cheap, no
tensor data read), and by the model's loader on each tensor it is handed (for checkpoints the
hook cannot see). Either way a mismatch is ONE KimiLinearCheckpointError naming the tensor.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .config import KimiLinearDims

FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors names; the plugin serves unquantized weights


class KimiLinearCheckpointError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape; the message names the tensor."""


def check_tensor(expected: dict[str, tuple[int, ...]], name: str, shape) -> bool:
    """True if `name` is a tensor we load; raise if its shape is wrong. Unknown names -> False."""
    want = expected.get(name)
    if want is None:
        return False
    if tuple(shape) != want and not _same_values(name, tuple(shape), want):
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {name} has shape {tuple(shape)}, but config.json "
            f"implies {want}: the checkpoint does not match its config")
    return True


def _same_values(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A_log is published [1, 1, H, 1]; some exports store it [H] (vLLM's in-tree loader takes
    both, and so does the layer's loader, which flattens it)."""
    return name.endswith(".A_log") and shape == (math.prod(want),)


def check_all_present(expected: dict[str, tuple[int, ...]], seen: set[str]) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {missing[0]} is missing{more}; expected shape "
            f"{expected[missing[0]]} from config.json. Missing: {missing[:8]}")


def check_dtype(name: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {name} has dtype {dtype}, but this plugin loads "
            f"unquantized floating-point weights ({', '.join(FLOAT_DTYPES)}): convert the "
            "checkpoint, or use one saved in bfloat16")


def safetensors_headers(model_dir: Path) -> dict[str, dict]:
    """{tensor name: {"dtype": "BF16", "shape": [...], ...}} of every *.safetensors file in a
    directory, from the file headers alone (an 8-byte length, then JSON): no tensor data is read,
    so this is cheap at 48B."""
    headers = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        headers |= {k: v for k, v in header.items() if k != "__metadata__"}
    return headers


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in safetensors_headers(model_dir).items()}


def check_checkpoint(dims: KimiLinearDims, model_dir: str | Path) -> None:
    """Every tensor the config implies is in the local checkpoint with the implied shape and a
    floating-point dtype; else one KimiLinearCheckpointError naming the tensor. Directories
    without safetensors (a hub id, other formats) are left to the loader, which applies the same
    shape checks while loading."""
    found = safetensors_headers(model_dir) if Path(model_dir).is_dir() else {}
    if not found:
        return
    expected = dims.checkpoint_shapes()
    for name, h in found.items():
        if check_tensor(expected, name, h["shape"]):
            check_dtype(name, h["dtype"])
    check_all_present(expected, set(found))
