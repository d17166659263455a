"""A config with no KDA layer (every layer MLA: the baseline users build to compare against)
served with vLLM's defaults, prefix caching on: tokens equal the independent reference, a repeated
prompt hits the prefix cache, and the engine holds no KDA state. (As a hybrid, vLLM's runner died
at the first request: "no mamba layers in the model".)"""
from __future__ import annotations

import pytest

from tests.engine_util import greedy, kimi_llm, prompt
from tests.reference import kimi_linear_ref as ref


@pytest.fixture(scope="module")
def all_mla_dir(tmp_path_factory):
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
    return build_tiny_checkpoint(tmp_path_factory.mktemp("all-mla") / "tiny", all_mla=True, layers=3)


def test_all_mla_serves_with_prefix_caching_and_equals_the_reference(all_mla_dir):
    ids = prompt(300, salt=11)
    want = ref.greedy_generate(ref.load(all_mla_dir), ids, 6)
    with kimi_llm(all_mla_dir, max_model_len=1024, max_num_seqs=2) as llm:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        assert not llm.llm_engine.vllm_config.model_config.is_hybrid
        runs = [llm.generate([{"prompt_token_ids": ids}], greedy(6), use_tqdm=False)[0] for _ in range(3)]
    for r in runs:
        assert list(r.outputs[0].token_ids) == want
    assert runs[0].num_cached_tokens == 0 and runs[-1].num_cached_tokens >= 256
