"""Chunked prefill and prefix caching on CPU (issue #4), in chunks of 16 tokens.

One engine: float32, prefix caching on (vLLM's default; KDA state in "align" mode, saved at every
128-token block boundary), chunked prefill with a budget of 16 tokens per step, so every prompt
longer than 16 tokens is prefilled in pieces and every MLA chunk after the first attends to
latent it reads back from the paged cache. Checked against the independent reference forward
(tests/reference), which runs each sequence in one piece with no cache at all. After every test,
zero KDA slots and zero MLA blocks are held.
"""
from __future__ import annotations

import pytest

from tests.engine_util import check_long_prompt, chunked_llm, greedy, prompt, state
from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.tools import planner

CHUNK = 16
MAX_LEN = 4096


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with chunked_llm(tiny_model_dir, CHUNK, MAX_LEN) as engine:
        yield engine


def test_chunked_prefill_and_prefix_caching_are_on(llm):
    cfg = llm.llm_engine.vllm_config
    assert cfg.scheduler_config.enable_chunked_prefill
    assert cfg.scheduler_config.max_num_batched_tokens == CHUNK
    assert cfg.cache_config.enable_prefix_caching
    assert cfg.cache_config.mamba_cache_mode == "align"


def test_layout_is_stated_and_equals_the_planner(llm, tiny_model_dir):
    layout = state(llm)["layout"]
    p = planner.plan(planner.load_dims(str(tiny_model_dir)), tp=1, kv_budget_bytes=planner.GiB,
                     max_model_len=MAX_LEN, dtype="float32", prefix_caching=True)
    assert layout["kda_state_cache_mode"] == "align"
    assert (layout["block_size"], layout["num_blocks"], layout["blocks_per_request"]) == \
        (p.block_size, p.num_blocks, p.blocks_per_request)
    assert (layout["kda_slot_bytes"], layout["mla_bytes_per_token"]) == \
        (p.kda_state_bytes_per_request, p.mla_bytes_per_token)
    assert layout["max_concurrency"] == pytest.approx(p.max_concurrency)


def test_long_prompt_in_chunks_of_16_equals_one_piece(llm, long_prompt_expected):
    check_long_prompt(llm, long_prompt_expected)


def test_prefix_hits_give_the_outputs_of_no_cache(llm, reference_model):
    shared = prompt(700, salt=5)  # 5 whole blocks of 128 can be reused
    prompts = [shared + prompt(n, salt=50 + i) for i, n in enumerate((9, 40, 130))]
    before = state(llm)["usage"]
    first = llm.generate([{"prompt_token_ids": prompts[0]}], greedy(8), use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy(8), use_tqdm=False)
    outs = first + rest
    assert outs[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in outs[1:]] == [640, 640]
    after = state(llm)["usage"]
    assert after["prefix_hits"] - before["prefix_hits"] == 1280
    assert after["prefix_hit_rate"] > 0
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference_model, p, 8), len(p)


def test_prefilling_and_decoding_requests_in_one_batch(llm, reference_model):
    # one long prompt prefilled 16 tokens a step while short ones decode in the same steps
    lens, news = [3, 600, 20, 5], [40, 4, 30, 12]
    prompts = [prompt(n, salt=70 + i) for i, n in enumerate(lens)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(k) for k in news],
                        use_tqdm=False)
    for p, k, o in zip(prompts, news, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference_model, p, k), len(p)


def test_seeded_sampling_does_not_depend_on_chunking(llm):
    # 16-token steps end inside the prompt: those steps sample and discard a token, and the
    # request's generator must be rewound (vLLM's CPU generators have no offset to rewind by).
    from vllm import SamplingParams
    p = prompt(300, salt=3)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    runs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for _ in range(3)]
    # later runs hit the prefix cache: they prefill 300 - 256 tokens in 3 steps, the first in 19
    assert runs[0].num_cached_tokens == 0 and runs[-1].num_cached_tokens == 256
    batch = llm.generate([{"prompt_token_ids": prompt(90, salt=4)}, {"prompt_token_ids": p}],
                         [greedy(30), params], use_tqdm=False)
    tokens = [list(r.outputs[0].token_ids) for r in runs + batch[1:]]
    assert all(t == tokens[0] for t in tokens), tokens
    greedy_tokens = list(llm.generate([{"prompt_token_ids": p}], greedy(24), use_tqdm=False)[0]
                         .outputs[0].token_ids)
    assert tokens[0] != greedy_tokens  # it did sample
