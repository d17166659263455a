"""Start-up checks for CUDA that vLLM itself makes only inside the engine core.

vLLM 0.32 picks the MLA attention and MLA prefill kernels in the worker, after the engine has
started: a model they cannot run dies there with a long traceback. These checks ask the same
questions of vLLM's own selectors while the config is built (the config hook, front-end process),
so `vllm serve` stops with one error saying what to change.
"""
from __future__ import annotations

import torch

from .config import MLADims


def check_cuda_mla(dtype: torch.dtype, mla: MLADims, platform) -> None:
    if dtype == torch.float32:
        # seen on an H200 (tests/gpu/RESULTS.md): FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA and the
        # FlashInfer MLA backends all refuse float32
        raise ValueError("Kimi Linear on CUDA: vLLM has no float32 MLA attention kernel; serve with "
                         "--dtype bfloat16 (or float16). The KDA recurrent state stays float32.")
    from vllm.v1.attention.backends.mla.prefill.base import MLADimensions
    from vllm.v1.attention.backends.mla.prefill.selector import MLAPrefillSelectorConfig

    dims = MLADimensions(qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
                         v_head_dim=mla.v_head_dim)
    try:
        platform.get_mla_prefill_backend_cls(MLAPrefillSelectorConfig(dtype=dtype, mla_dimensions=dims))
    except ValueError as e:
        raise ValueError(
            f"Kimi Linear on CUDA: no MLA prefill kernel of vLLM on this GPU takes qk_nope_head_dim="
            f"{dims.qk_nope_head_dim}, qk_rope_head_dim={dims.qk_rope_head_dim}, v_head_dim="
            f"{dims.v_head_dim} (vLLM: {e}). The published 128 / 64 / 128 work; the tiny builder writes "
            f"them with --qk-nope 128 --qk-rope 64 --v-head 128.") from e
    except Exception:  # noqa: BLE001 - the selector could not run here: no verdict on the model,
        return  # so the worker decides, as it would without this check
