"""The plugin end to end on CPU: vLLM's engine serving the tiny Kimi Linear checkpoint (KDA + MLA
+ MoE, float32) must reproduce the independent reference forward (tests/reference) token for
token under greedy decoding, and its prompt logprobs must match closely.

One engine for the module (start-up ~30 s on 2 cores). The plugin is loaded through its
`vllm.general_plugins` entry point, as in production (the package must be installed: it is,
editable, by deploy/setup-cpu.sh). Prompts of 3..200 tokens cover short prompts (shorter than
the conv window), several KDA chunks, and batches mixing decodes with new prefills.
"""
from __future__ import annotations

import pytest

from tests.engine_util import greedy as _greedy
from tests.engine_util import kimi_llm, prompt as _prompt, vllm_prompt_logprobs
from tests.reference import kimi_linear_ref as ref

MAX_NEW = 32
LENGTHS = [3, 17, 64, 200]


@pytest.fixture(scope="module")
def reference(reference_model):
    return reference_model


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with kimi_llm(tiny_model_dir, max_model_len=1024, max_num_seqs=3) as engine:
        yield engine


def test_engine_uses_our_model(llm):
    cfg = llm.llm_engine.vllm_config
    assert cfg.model_config.architecture == "KimiLinearForCausalLM"
    assert cfg.model_config.is_hybrid and cfg.model_config.use_mla
    # vLLM CPU turns both off for MLA models; the plugin keeps them (vllm_kimi_linear.patches.cpu_platform)
    assert cfg.cache_config.enable_prefix_caching and cfg.scheduler_config.enable_chunked_prefill


def test_greedy_matches_reference(llm, reference):
    prompts = [_prompt(n, salt=i) for i, n in enumerate(LENGTHS)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(MAX_NEW))
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference, p, MAX_NEW), len(p)


def test_prompt_logprobs_match_reference(llm, reference):
    prompts = [_prompt(n, salt=10 + i) for i, n in enumerate(LENGTHS)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(1, prompt_logprobs=0))
    for p, o in zip(prompts, outs):
        got = vllm_prompt_logprobs(o, p)
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
