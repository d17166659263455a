"""The plugin end to end on CPU: vLLM's engine serving the tiny Kimi Linear checkpoint (KDA + MLA
+ MoE, float32) must reproduce the independent reference forward (tests/reference) token for
token under greedy decoding, and its prompt logprobs must match closely.

One engine for the module (start-up ~30 s on 2 cores). The plugin is loaded through its
`vllm.general_plugins` entry point, as in production (the package must be installed: it is,
editable, by deploy/setup-cpu.sh). Prompts of 3..200 tokens cover short prompts (shorter than
the conv window), several KDA chunks, and batches mixing decodes with new prefills.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.builder import build_tiny_checkpoint

MAX_NEW = 32
LENGTHS = [3, 17, 64, 200]


def _prompt(n: int, salt: int) -> list[int]:
    # deterministic ids spread over the vocabulary, avoiding the special tokens at the end
    return [(37 * j + 101 * salt + 7) % 1000 for j in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("e2e") / "tiny")


@pytest.fixture(scope="module")
def reference(model_dir):
    return ref.load(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "kimi_linear" not in plugins.split(","):
        pytest.skip("VLLM_PLUGINS excludes kimi_linear")
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "TRITON_INTERPRET")}
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # conftest turns on Triton's interpreter for our kernel tests; vLLM must not see it
    os.environ.pop("TRITON_INTERPRET", None)
    from vllm import LLM
    engine = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True,
                 max_num_seqs=3, seed=0)
    yield engine
    del engine
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _greedy(max_tokens: int, **kw):
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_engine_uses_our_model(llm):
    cfg = llm.llm_engine.vllm_config
    assert cfg.model_config.architecture == "KimiLinearForCausalLM"
    assert cfg.model_config.is_hybrid and cfg.model_config.use_mla
    assert cfg.cache_config.enable_prefix_caching is False  # on CPU, for now


def test_greedy_matches_reference(llm, reference):
    prompts = [_prompt(n, salt=i) for i, n in enumerate(LENGTHS)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(MAX_NEW))
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference, p, MAX_NEW), len(p)


def test_prompt_logprobs_match_reference(llm, reference):
    prompts = [_prompt(n, salt=10 + i) for i, n in enumerate(LENGTHS)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(1, prompt_logprobs=0))
    for p, o in zip(prompts, outs):
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        got = torch.tensor([o.prompt_logprobs[t][p[t]].logprob for t in range(1, len(p))])
        want = ref.prompt_logprobs(reference, p)
        assert (got - want).abs().max().item() < 1e-3, len(p)


def test_mixed_decode_and_prefill_batches(llm, reference):
    # max_num_seqs=3 and unequal lengths: requests finish at different steps, so waiting
    # prompts are prefilled in the same step as other requests' decodes, and freed state
    # slots are reused by new requests (stale state must not leak in).
    lens, news = [5, 40, 2, 120, 9, 33], [6, 20, 12, 16, 24, 8]
    prompts = [_prompt(n, salt=20 + i) for i, n in enumerate(lens)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [_greedy(k) for k in news])
    for p, k, o in zip(prompts, news, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference, p, k), len(p)
