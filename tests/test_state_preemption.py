"""Preemption on CPU (issue #4): a cache too small for the batch, chunks of 1000 tokens.

One engine: float32, prefix caching on, chunked prefill with a budget of 1000 tokens per step,
and a pool of only 40 blocks of 128 tokens shared by MLA blocks and KDA state slots (one request
of max_model_len needs 31). Four requests that together outgrow it force the scheduler to
preempt: a preempted request gives its KDA slots and MLA blocks back and is recomputed later
(its KDA state rebuilt from the prompt plus what it had generated, or restored from a block-
boundary checkpoint on a prefix hit). Its output must equal the same request run alone,
unpreempted, and everything is released at the end.
"""
from __future__ import annotations

import pytest

from tests.engine_util import check_long_prompt, chunked_llm, greedy, prompt, state

CHUNK = 1000
MAX_LEN = 3200
POOL_BLOCKS = 40


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with chunked_llm(tiny_model_dir, CHUNK, MAX_LEN, num_gpu_blocks_override=POOL_BLOCKS) as engine:
        yield engine


def _preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def test_pool_is_as_small_as_asked(llm):
    layout = state(llm)["layout"]
    assert layout["num_blocks"] == POOL_BLOCKS
    assert layout["max_concurrency"] < 2  # two requests of max_model_len do not fit


def test_long_prompt_in_chunks_of_1000_equals_one_piece(llm, long_prompt_expected):
    check_long_prompt(llm, long_prompt_expected)


def test_preempted_requests_equal_their_unpreempted_runs(llm):
    # 4 x (500-token prompt + 300 new) needs 4 x (7 MLA + 6 KDA) = 52 blocks > 40
    prompts = [prompt(500, salt=60 + i) for i in range(4)]
    params = greedy(300)
    alone = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    assert llm.reset_prefix_cache()  # the batch must recompute its prompts, not reuse them
    before = _preemptions(llm)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert _preemptions(llm) > before, "the batch fit: the test no longer forces preemption"
    for a, t in zip(alone, together):
        assert list(t.outputs[0].token_ids) == list(a.outputs[0].token_ids)
