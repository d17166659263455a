"""A checkpoint against its config: every tensor the config implies, with its shape and dtype.

Run twice: by the config hook at start-up on a local checkpoint's safetensors headers (cheap, no
tensor data read), and by the model's loader on each tensor it is handed (for checkpoints the
hook cannot see). Either way a mismatch is ONE KimiLinearCheckpointError naming the tensor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import KimiLinearDims

FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors names of unquantized weights
FP8_DTYPES = ("F8_E4M3",)

# The modules vLLM builds as linear layers (what a quantization method may quantize); the MoE
# router (`gate`), embedding, lm_head, norms and convs are never quantized by this plugin.
LINEAR_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "b_proj", "f_a_proj", "f_b_proj",
                            "g_a_proj", "g_b_proj", "o_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                            "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
# Tensor names quantization methods add beside (or instead of) `weight`.
QUANT_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "qweight", "qzeros", "scales",
                  "g_idx", "weight_packed", "weight_shape", "weight_zero_point", "weight_global_scale")


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


def check_dtype(name: str, dtype: str, quant: FP8Scheme | None = None) -> None:
    want = FP8_DTYPES if quant is not None and quant.is_quantized(name) else FLOAT_DTYPES
    if dtype not in want:
        how = ("an FP8 weight (quantization_config says this module is quantized)" if want is FP8_DTYPES
               else "a floating-point tensor")
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {name} has dtype {dtype}, but it must be {how} "
            f"({', '.join(want)}): the checkpoint does not match its config.json "
            "(quantization_config, ignored_layers)")


def module_of(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`."""
    return name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class FP8Scheme:
    """quantization_config of an FP8 checkpoint as DeepSeek-V3 / Kimi-K2 store it: every linear
    weight not in `ignored_layers` is float8_e4m3fn, with a float32 `weight_scale_inv` holding
    one dequantization factor per block (weight_block_size [n, k], n rows by k columns)."""

    block: tuple[int, int]
    ignored: frozenset[str]

    @classmethod
    def from_config(cls, qc: dict) -> FP8Scheme:
        block = qc.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise KimiLinearCheckpointError(
                f"Kimi Linear (vllm-kimi-linear): quantization_config.weight_block_size is "
                f"{block!r}; FP8 checkpoints are served block-quantized, e.g. [128, 128] (per-tensor "
                "FP8 is not supported: re-export with block scales)")
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
        return cls(tuple(block), frozenset(ignored))

    def is_quantized(self, name: str) -> bool:
        module = module_of(name)
        return (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR_MODULES
                and module not in self.ignored)

    @staticmethod
    def scale_name(weight_name: str) -> str:
        return module_of(weight_name) + ".weight_scale_inv"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(math.ceil(d / b) for d, b in zip(shape, self.block))

    def expected(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The unquantized tensor shapes plus each quantized weight's scale."""
        out = dict(shapes)
        for name, shape in shapes.items():
            if self.is_quantized(name):
                out[self.scale_name(name)] = self.scale_shape(shape)
        return out


def quant_scheme(cfg: dict) -> FP8Scheme | None:
    """The checkpoint's quantization as config.json states it: None (unquantized) or FP8;
    any other method is refused here, by name, before a worker starts."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise KimiLinearCheckpointError(
            f"Kimi Linear (vllm-kimi-linear): config.json quantization_config.quant_method is "
            f"{method!r}; this plugin serves unquantized checkpoints and 'fp8' ones (float8_e4m3 "
            "weights with block-wise weight_scale_inv, as DeepSeek-V3/Kimi-K2 store them). Use an "
            "FP8 or bfloat16 export of the model")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise KimiLinearCheckpointError(
            f"Kimi Linear (vllm-kimi-linear): quantization_config.fmt is {qc['fmt']!r}; only "
            "float8 e4m3 weights are served")
    return FP8Scheme.from_config(qc)


def expected_tensors(dims: KimiLinearDims, quant: FP8Scheme | None) -> dict[str, tuple[int, ...]]:
    shapes = dims.checkpoint_shapes()
    return shapes if quant is None else quant.expected(shapes)


def check_no_quant_tensors(names) -> None:
    """An unquantized config with quantization tensors in the checkpoint: the weights would load
    as raw FP8/int codes (or the scales be dropped) without a word."""
    stray = sorted(n for n in names if n.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    if stray:
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {stray[0]} (and {len(stray) - 1} more) is a "
            "quantization tensor, but config.json has no quantization_config: add the "
            "quantization_config the checkpoint was exported with, or use an unquantized export")


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


def check_checkpoint(dims: KimiLinearDims, model_dir: str | Path, quant: FP8Scheme | None = None) -> None:
    """Every tensor the config implies (quantization scales included) is in the local checkpoint
    with the implied shape and dtype; else one KimiLinearCheckpointError naming the tensor.
    Directories without safetensors (a hub id, other formats) are left to the loader, which
    applies the same shape checks while loading."""
    found = safetensors_headers(model_dir) if Path(model_dir).is_dir() else {}
    if not found:
        return
    if quant is None:
        check_no_quant_tensors(found)
    expected = expected_tensors(dims, quant)
    for name, h in found.items():
        if check_tensor(expected, name, h["shape"]):
            check_dtype(name, h["dtype"], quant)
    check_all_present(expected, set(found))
