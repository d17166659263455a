"""FP8 block-quantized copies of a Kimi Linear checkpoint, stored as DeepSeek-V3 / Kimi-K2 FP8
checkpoints are, and their dequantized twins (the reference a quantized server is compared with).

    python -m vllm_kimi_linear.tools.quantize SRC DST                 # FP8, weight_block_size 128x128
    python -m vllm_kimi_linear.tools.quantize SRC DST --dequantized   # the float32 twin of an FP8 SRC

A quantized linear weight W [N, K] becomes `weight` (float8_e4m3fn) and `weight_scale_inv`
(float32 [ceil(N/bn), ceil(K/bk)]), one factor per bn x bk block, W ~= weight * factor; config.json
gains the `quantization_config` vLLM's Fp8Config reads. Quantized: every linear module of the
attention and feed-forward layers (routed and shared experts included). Kept in the source
dtype: embedding, lm_head, the MoE router, norms, convs, A_log, dt_bias, and KDA's `b_proj`
(one row per head, listed in `ignored_layers`; see layers/kda.py). Which modules are linear is
`checkpoint.LINEAR_MODULES`, the same table the start-up check reads. It imports no vLLM.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import FP8Scheme, module_of, quant_scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
NOT_QUANTIZED = ("b_proj",)  # linear modules left in the source dtype (ignored_layers)


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """w zero-padded to whole blocks, viewed [N/bn, bn, K/bk, bk]; and w's own shape."""
    (n, k), (bn, bk) = w.shape, block
    pn, pk = -n % bn, -k % bk
    padded = torch.nn.functional.pad(w.double(), (0, pk, 0, pn))
    return padded.view((n + pn) // bn, bn, (k + pk) // bk, bk), (n, k)


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 weight_scale_inv): each block scaled so its largest |value| is 448."""
    b, (n, k) = _blocks(w, block)
    amax = b.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()  # stored as is
    q = (b / scale.double()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.view(b.shape[0] * block[0], b.shape[2] * block[1])[:n, :k].contiguous()
    return q, scale.view(b.shape[0], b.shape[2]).float()


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float64 weight an FP8 block-quantized one stands for."""
    n, k = q.shape
    rows = scale_inv.double().repeat_interleave(block[0], 0)[:n]
    return q.double() * rows.repeat_interleave(block[1], 1)[:, :k]


def _read(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(str(f))
    if not tensors:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return tensors


def _write(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """dst = src's non-weight files (tokenizer, generation config, ...), config, one safetensors."""
    from safetensors.torch import save_file
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    out = dst / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"format": "pt"})
    out.chmod(0o644)
    return dst


def quantize_checkpoint(src, dst, block: tuple[int, int] = (128, 128)) -> Path:
    """Write the FP8 block-quantized copy of the unquantized checkpoint `src` to `dst`."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config']})")
    tensors = _read(src)
    ignored = sorted({module_of(n) for n in tensors
                      if n.endswith(".weight") and module_of(n).rsplit(".", 1)[-1] in NOT_QUANTIZED})
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "ignored_layers": ignored}
    scheme = quant_scheme(config)
    out = {}
    for name, w in tensors.items():
        if scheme.is_quantized(name):
            out[name], out[scheme.scale_name(name)] = quantize_block(w, block)
        else:
            out[name] = w
    return _write(src, dst, out, config)


def dequantized_checkpoint(src, dst) -> Path:
    """Write the float32 checkpoint an FP8 one stands for (no quantization_config): served
    unquantized, it is what the FP8 server should reproduce up to its kernels' rounding."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    scheme = quant_scheme(config)
    if scheme is None:
        raise ValueError(f"{src} is not quantized (config.json has no quantization_config)")
    tensors = _read(src)
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if scheme.is_quantized(name):
            w = dequantize_block(w, tensors[FP8Scheme.scale_name(name)], scheme.block)
        out[name] = w.float() if w.is_floating_point() else w
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    return _write(src, dst, out, config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_kimi_linear.tools.quantize",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="checkpoint directory to read")
    p.add_argument("dst", type=Path, help="directory to write (created if missing)")
    p.add_argument("--dequantized", action="store_true",
                   help="SRC is FP8: write its dequantized float32 twin instead")
    p.add_argument("--block", type=int, nargs=2, default=(128, 128), metavar=("N", "K"),
                   help="weight_block_size (default 128 128, as DeepSeek-V3 and Kimi-K2)")
    a = p.parse_args(argv)
    if a.dequantized:
        print(dequantized_checkpoint(a.src, a.dst))
    else:
        print(quantize_checkpoint(a.src, a.dst, tuple(a.block)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
