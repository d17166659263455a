"""Pipeline parallelism on CPU: TP 1 x PP 2 (the tiny model's 4 layers split 2 + 2, a KDA stage
and a KDA + MLA stage), chunked prefill in chunks of 100 and prefix caching on: greedy tokens and
prompt log-probabilities equal the independent reference, a prompt in chunks equals one piece,
and a repeated prompt hits the prefix cache with the same tokens. One engine for the module."""
from __future__ import annotations

import pytest

from tests.engine_util import check_greedy_and_logprobs, check_long_prompt, chunked_llm, greedy, prompt
from tests.reference import kimi_linear_ref as ref

PP = 2
CHUNK = 100
MAX_LEN = 4096


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with chunked_llm(tiny_model_dir, CHUNK, MAX_LEN, pipeline_parallel_size=PP,
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                          # collective_rpc(stage_layers) pickles a function
                          "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}) as engine:
        yield engine


def stage_layers(worker) -> list[str | None]:
    """Run on every worker through collective_rpc: each layer's attention class, None where the
    layer lives on another stage."""
    from vllm.model_executor.models.utils import PPMissingLayer
    return [None if isinstance(layer, PPMissingLayer) else type(layer.self_attn).__name__
            for layer in worker.model_runner.model.model.layers]


def test_the_model_is_split_in_two_stages(llm):
    """Layers 0-1 (KDA) on the first stage, 2 (KDA) and 3 (MLA) on the second."""
    kda, mla = "KimiDeltaAttention", "KimiMLAAttention"
    assert llm.collective_rpc(stage_layers) == [[kda, kda, None, None], [None, None, kda, mla]]


def test_pp2_greedy_and_logprobs_equal_the_reference(llm, reference_model):
    check_greedy_and_logprobs(llm, reference_model, salt=40)


def test_long_prompt_in_chunks_of_100_equals_one_piece(llm, long_prompt_expected):
    check_long_prompt(llm, long_prompt_expected)


def test_prefix_hit_gives_the_tokens_of_no_cache(llm, reference_model):
    p = prompt(700, salt=77)
    runs = [llm.generate([{"prompt_token_ids": p}], greedy(8), use_tqdm=False)[0] for _ in range(3)]
    want = ref.greedy_generate(reference_model, p, 8)
    assert [list(r.outputs[0].token_ids) for r in runs] == [want] * 3
    assert runs[-1].num_cached_tokens > 0
