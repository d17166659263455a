"""vllm.v1.worker.mamba_utils.batch_memcpy, on CPU (every model; a plain bug fix).

In "align" mode the runner copies each request's KDA (Mamba-type) state from its previous block to
its current one with a Triton kernel on raw pointers, which cannot run on CPU. The same copies by
memmove (overlap-safe, like the kernel).
"""
from __future__ import annotations

import ctypes


def cpu_batch_memcpy(src_ptrs, dst_ptrs, sizes) -> None:
    for src, dst, n in zip(src_ptrs.tolist(), dst_ptrs.tolist(), sizes.tolist()):
        ctypes.memmove(dst, src, n)


def install() -> None:
    from vllm.v1.worker import mamba_utils

    from . import written_for
    written_for(__name__)
    mamba_utils.batch_memcpy = cpu_batch_memcpy
