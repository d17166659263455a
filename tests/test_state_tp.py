"""Tensor parallelism on CPU (issue #4): the tiny model at TP=2 against the reference.

One engine: TP=2 (two worker processes, one core each, gloo), float32, prefix caching off (KDA
state in mode "none"), chunked prefill in chunks of 100 tokens. What each rank holds is read from
the workers; the outputs must equal the independent reference forward, which is what TP=1 gives
(tests/test_model_e2e.py): same greedy tokens, prompt logprobs within 1e-3. Aborted requests,
even mid-prefill, release every KDA slot and MLA block.
"""
from __future__ import annotations

import time

import pytest

from tests.engine_util import (assert_nothing_held, check_greedy_and_logprobs, check_long_prompt,
                               chunked_llm, greedy, prompt, shard_report, state)
from tests.reference import kimi_linear_ref as ref
from vllm_kimi_linear.tools import planner

TP = 2
CHUNK = 100
MAX_LEN = 4096


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with chunked_llm(tiny_model_dir, CHUNK, MAX_LEN, tensor_parallel_size=TP, enable_prefix_caching=False,
                     disable_log_stats=True,
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                          # collective_rpc(shard_report) pickles a function
                          "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}) as engine:
        yield engine


def test_each_rank_holds_its_shard(llm, tiny_model_dir):
    d = planner.load_dims(str(tiny_model_dir))
    H, D = d.kda.num_heads, d.kda.head_dim
    n, nope, rope, v = d.mla.num_heads, d.mla.qk_nope_head_dim, d.mla.qk_rope_head_dim, d.mla.v_head_dim
    reports = sorted(llm.collective_rpc(shard_report), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(TP))
    for r in reports:
        # KDA by head; the low-rank f_a/g_a down projections replicated
        assert (r["kda_heads"], r["kda_A_log"], r["kda_dt_bias"]) == (H // TP, (H // TP,), (H * D // TP,))
        # one input GEMM: q, k, v, b by head, the low-rank f_a / g_a whole on every rank
        assert r["kda_in_proj"] == [H * D // TP] * 3 + [H // TP, D, D]
        assert r["kda_conv"] == (3 * H * D // TP, d.kda.short_conv_kernel_size)
        assert r["kda_f_b_out"] == r["kda_o_in"] == H * D // TP
        # MLA by head; the latent projection replicated
        assert r["mla_q_out"] == n * (nope + rope) // TP
        assert r["mla_kv_b_out"] == n * (nope + v) // TP and r["mla_o_in"] == n * v // TP
        assert r["mla_kv_a_out"] == d.mla.kv_lora_rank + rope
        # MoE: every expert on every rank, its intermediate dimension split (tensor-parallel)
        assert r["moe_local_experts"] == d.moe.num_experts
        assert r["moe_intermediate"] == d.moe.intermediate_size // TP
        # vocabulary-parallel embedding and head
        assert r["embed_rows"] == r["lm_head_rows"] >= d.vocab_size // TP
        assert r["embed_rows"] * TP < d.vocab_size + 64 * TP
        # vLLM's MixtureOfExperts interface (what EPLB reads): no EP, so every expert is local
        moe_layers = sum(d.is_moe(i) for i in range(d.num_layers))
        E = d.moe.num_experts
        assert r["moe_interface"] == {
            "is_moe": True, "moe_layers_are_the_runners": True,
            "expert_weight_tensors": [2] * moe_layers,  # w13 and w2 of each MoE layer
            "num_moe_layers": moe_layers, "num_expert_groups": d.moe.num_expert_group,
            "num_logical_experts": E, "num_physical_experts": E, "num_local_physical_experts": E,
            "num_routed_experts": E, "num_shared_experts": d.moe.num_shared_experts,
            "num_redundant_experts": 0}, r["moe_interface"]


def test_layout_halves_the_kda_state_per_rank(llm, tiny_model_dir):
    layout = state(llm)["layout"]
    dims = planner.load_dims(str(tiny_model_dir))
    p = planner.plan(dims, tp=TP, kv_budget_bytes=planner.GiB, max_model_len=MAX_LEN,
                     dtype="float32", prefix_caching=False)
    p1 = planner.plan(dims, tp=1, kv_budget_bytes=planner.GiB, max_model_len=MAX_LEN,
                      dtype="float32", prefix_caching=False)
    assert layout["kda_state_cache_mode"] == "none"
    assert layout["kda_slot_bytes"] == p.kda_state_bytes_per_request < p1.kda_state_bytes_per_request
    assert layout["mla_bytes_per_token"] == p.mla_bytes_per_token == p1.mla_bytes_per_token
    assert (layout["num_blocks"], layout["blocks_per_request"]) == (p.num_blocks, p.blocks_per_request)


def test_tp2_greedy_and_logprobs_equal_the_reference(llm, reference_model):
    check_greedy_and_logprobs(llm, reference_model, salt=30)


def test_long_prompt_in_chunks_of_100_equals_one_piece(llm, long_prompt_expected):
    check_long_prompt(llm, long_prompt_expected)


def test_abort_mid_prefill_and_mid_decode_releases_everything(llm, reference_model):
    engine = llm.llm_engine
    ids = {f"abort-{i}": prompt(n, salt=80 + i) for i, n in enumerate((900, 1200, 5))}
    for rid, p in ids.items():
        engine.add_request(rid, {"prompt_token_ids": p}, greedy(200))
    for _ in range(3):  # 100 tokens a step: the first prompt is mid-prefill, the rest wait
        engine.step()
    held = state(llm)["usage"]
    assert held["running_requests"] >= 1 and held["kda_slots_in_use"] > 0 and held["mla_blocks_in_use"] > 0
    engine.abort_request(list(ids))
    deadline = time.time() + 60
    while engine.has_unfinished_requests() and time.time() < deadline:
        engine.step()
    assert_nothing_held(llm)
    # the released slots and blocks serve a new request exactly
    p = prompt(300, salt=90)
    out = llm.generate([{"prompt_token_ids": p}], greedy(8), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == ref.greedy_generate(reference_model, p, 8)
