"""What the GPU serving tests share: server configurations, one `vllm serve` per configuration,
log-probabilities over the OpenAI API, the two float64 references, and the results file.

Which implementation serves is chosen by $KIMI_GPU_IMPL: "plugin" (this project, loaded through
its entry point) or "intree" (vLLM's own KimiLinearForCausalLM, the anchor: the plugin is not
loaded, VLLM_PLUGINS names none). Every comparison is appended to
$KIMI_GPU_RESULTS/gpu_checks.jsonl (one JSON object per check), which RESULTS documents quote.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch

from vllm_kimi_linear.tools.harness import impl_env, vllm_serve

IMPL = os.environ.get("KIMI_GPU_IMPL", "plugin")
SERVED = "kimi-linear"
RESULTS = Path(os.environ.get("KIMI_GPU_RESULTS", "gpu-results"))

# KIMI_GPU_DRY_RUN_ON_CPU=1 runs the module's plumbing against a CPU server (no graphs there):
# for editing these tests without spending GPU time; the results mean nothing for the GPU.
DRY_RUN_ON_CPU = os.environ.get("KIMI_GPU_DRY_RUN_ON_CPU") == "1"
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() or DRY_RUN_ON_CPU),
    reason="requires CUDA (an NVIDIA GPU) and vLLM's CUDA build: see tests/gpu/README.md")


@dataclass(frozen=True)
class ServerConfig:
    """One `vllm serve` of one checkpoint. `args` are the flags beyond vLLM's defaults."""
    name: str
    layout: str  # a vllm_kimi_linear.tools.builder.LAYOUTS key
    dtype: str  # the checkpoint's dtype; the server runs in it
    args: tuple[str, ...] = ()
    features: frozenset = field(default_factory=frozenset)  # which checks apply

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype}")
        # vLLM's CUDA MLA kernels take bf16 / fp16 only: float32 configurations are refusals


CONFIGS = {
    # vLLM's defaults: CUDA graphs (breakable piecewise + FULL decode), async scheduling,
    # chunked prefill, prefix caching; the bf16 checkpoint served as it is
    "bf16": ServerConfig("bf16", "tiny", "bfloat16", (),
                         frozenset({"concurrency", "abort", "prefix", "state", "bad_input"})),
    # a pool small enough to preempt (blocks of 128 tokens on the GPU, as vLLM aligns MLA with
    # the KDA state pages: one 2048-token request needs 16 MLA + 6 KDA blocks), prompts
    # prefilled in chunks of 256 tokens
    "bf16-small": ServerConfig("bf16-small", "tiny", "bfloat16",
                               ("--max-model-len", "2048", "--max-num-batched-tokens", "256",
                                "--max-num-seqs", "8", "--num-gpu-blocks-override", "24"),
                               frozenset({"preempt", "prefix"})),
    # MLA first, two dense layers, 3 KDA heads, 5 MLA heads, 7 experts (top 3)
    "mla-first": ServerConfig("mla-first", "mla-first", "bfloat16", (), frozenset()),
}


# vLLM's GPU MLA prefill (FLASH_ATTN) takes the published head dims only (128 / 64 / 128), not
# the builder's CPU default of 64 / 64 / 64
GPU_MLA_DIMS = {"qk_nope": 128, "qk_rope": 64, "v_head": 128}


def selected_configs() -> list[str]:
    names = os.environ.get("KIMI_GPU_CONFIGS")
    return names.split(",") if names else list(CONFIGS)


def record(config: str, check: str, **values) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = {"impl": IMPL, "config": config, "check": check, "time": time.strftime("%H:%M:%S"), **values}
    with open(RESULTS / "gpu_checks.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def diff_stats(got: torch.Tensor, want: torch.Tensor) -> dict:
    d = (got.double() - want.double()).abs()
    return {"n": int(d.numel()), "median": float(d.median()), "mean": float(d.mean()),
            "p99": float(d.quantile(0.99)),
            "max": float(d.max()), "argmax": int(d.argmax())}


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@dataclass
class Served:
    config: ServerConfig
    base: str  # http://host:port
    model_dir: Path
    log_path: Path
    startup_s: float

    def post(self, path: str, body: dict, timeout: float = 300) -> requests.Response:
        return requests.post(self.base + path, json=body, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(config: ServerConfig, workdir: Path, timeout: float = 600):
    from vllm_kimi_linear.tools.builder import LAYOUTS, build_tiny_checkpoint
    model_dir = build_tiny_checkpoint(workdir / f"{config.layout}-{config.dtype}", dtype=config.dtype,
                                      **{**LAYOUTS[config.layout], **GPU_MLA_DIMS})
    log_path = RESULTS / f"server-{IMPL}-{config.name}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with vllm_serve(model_dir, SERVED, list(config.args), impl_env(IMPL), log_path, timeout) as base:
        served = Served(config, base, model_dir, log_path, time.time() - t0)
        record(config.name, "startup", seconds=round(served.startup_s, 1), args=list(config.args))
        yield served


# ---------------------------------------------------------------------------------------------
# Log-probabilities through the OpenAI-compatible API
# ---------------------------------------------------------------------------------------------

def prompt_logprobs(s: Served, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(log p(ids[t] | ids[:t]) for t >= 1, the server's top-1 token at each of those positions)."""
    r = s.post("/v1/completions", {"model": SERVED, "prompt": ids, "max_tokens": 1, "temperature": 0,
                                   "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids), (len(plp), len(ids))
    lp, top = [], []
    for t in range(1, len(ids)):
        entries = plp[t]
        lp.append(entries[str(ids[t])]["logprob"])
        top.append(int(min(entries, key=lambda k: entries[k]["rank"])))
    return torch.tensor(lp, dtype=torch.float64), top


def generate(s: Served, ids: list[int], n: int, stream: bool = False) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of `n` tokens: (token ids, the server's log-probability of each)."""
    body = {"model": SERVED, "prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    r = s.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["logprobs"]
    toks = [int(t.split(":", 1)[1]) for t in lps["tokens"]]
    assert len(toks) == n, lps
    return toks, torch.tensor(lps["token_logprobs"], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The two references, float64 on the CPU, of the checkpoint's exact weights
# ---------------------------------------------------------------------------------------------

class References:
    """tests/reference (written from the equations) and Hugging Face transformers' own
    KimiLinearForCausalLM, loaded once per checkpoint."""

    def __init__(self, model_dir: Path):
        from tests.reference import hf_ref, kimi_linear_ref
        self.ours_mod, self.hf_mod = kimi_linear_ref, hf_ref
        self.ours = kimi_linear_ref.load(model_dir, dtype=torch.float64)
        eps = json.loads((Path(model_dir) / "config.json").read_text())["rms_norm_eps"]
        # vLLM (in-tree and plugin) builds kv_a_layernorm with rms_norm_eps; HF hard-codes 1e-6
        self.hf = hf_ref.load(model_dir, dtype=torch.float64, kv_a_layernorm_eps=eps)

    def prompt_logprobs(self, ids) -> dict[str, torch.Tensor]:
        """{"ref", "hf"}: log p(ids[t] | ids[:t]) for t >= 1; "ref_all": tests/reference's whole
        log-distribution at each of those positions [T-1, vocab]."""
        lg = torch.log_softmax(self.ours_mod.forward(self.ours, ids).double(), -1)[:-1]
        ref = lg.gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]
        return {"ref": ref, "ref_all": lg, "hf": self.hf_mod.prompt_logprobs(self.hf, ids).double()}
