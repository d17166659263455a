"""One vLLM engine in the test process, as the e2e and state-manager modules use it.

    with kimi_llm(model_dir, max_num_batched_tokens=16) as llm: ...
    state(llm)           # the engine core's {"layout", "usage"} (vllm_kimi_linear.state_manager, via patches/engine_core.py)
    greedy(8)            # SamplingParams for greedy decoding of exactly 8 tokens
    prompt(3000, salt)   # deterministic token ids spread over the tiny vocabulary

The plugin is loaded through its entry point, as in production; vLLM must not see the Triton
interpreter switch that tests/conftest.py sets for the kernel tests.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TRITON_INTERPRET": None}


def prompt(n: int, salt: int) -> list[int]:
    # avoids the special tokens at the end of the tiny vocabulary
    return [(37 * j + 101 * salt + 7) % 1000 for j in range(n)]


def greedy(max_tokens: int, **kw):
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@contextmanager
def kimi_llm(model_dir, env: dict | None = None, **engine_kw):
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "kimi_linear" not in plugins.split(","):
        pytest.skip("VLLM_PLUGINS excludes kimi_linear")
    wanted = {**ENGINE_ENV, **(env or {})}
    saved = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    from vllm import LLM
    kw = dict(dtype="float32", enforce_eager=True, seed=0)
    kw.update(engine_kw)
    try:
        llm = LLM(model=str(model_dir), **kw)
    except BaseException:
        _restore(saved)
        raise
    # The engine's processes have started without TRITON_INTERPRET; this process needs it back at
    # once: Triton (imported lazily by fla's references here) reads it when first imported.
    _restore({"TRITON_INTERPRET": saved["TRITON_INTERPRET"]})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        _restore(saved)


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def chunked_llm(model_dir, chunk: int, max_len: int, **engine_kw):
    """`kimi_llm` with chunked prefill in chunks of `chunk` tokens and prefix caching on (what
    the state modules serve), 4 sequences at most and vLLM's stats logged."""
    kw = dict(max_model_len=max_len, max_num_seqs=4, enable_prefix_caching=True,
              enable_chunked_prefill=True, max_num_batched_tokens=chunk, disable_log_stats=False)
    return kimi_llm(model_dir, **(kw | engine_kw))


def check_greedy_and_logprobs(llm, reference_model, salt: int, lengths=(4, 33, 150, 410),
                              new_tokens: int = 16, tol: float = 1e-3) -> None:
    """Prompts of `lengths` tokens in one batch: greedy tokens equal the reference's, and every
    prompt log-probability is within `tol` of it."""
    from tests.reference import kimi_linear_ref as ref
    prompts = [prompt(n, salt=salt + i) for i, n in enumerate(lengths)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(new_tokens, prompt_logprobs=0),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy_generate(reference_model, p, new_tokens), len(p)
        err = (vllm_prompt_logprobs(o, p) - ref.prompt_logprobs(reference_model, p)).abs().max()
        assert err.item() < tol, len(p)


def state(llm) -> dict:
    return llm.llm_engine.engine_core.call_utility("kimi_linear_state")


def assert_nothing_held(llm) -> None:
    u = state(llm)["usage"]
    assert (u["running_requests"], u["kda_slots_in_use"], u["mla_blocks_in_use"]) == (0, 0, 0), u


def vllm_prompt_logprobs(output, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from a RequestOutput made with prompt_logprobs=0."""
    import torch
    lp = output.prompt_logprobs
    assert lp[0] is None and len(lp) == len(ids)
    return torch.tensor([lp[t][ids[t]].logprob for t in range(1, len(ids))])


def check_long_prompt(llm, expected, tol: float = 2e-3) -> None:
    """The long prompt, however the engine chunks it, against the reference in one piece:
    every prompt position's log-probability, then the greedy continuation."""
    ids, new_tokens, want_lp = expected
    out = llm.generate([{"prompt_token_ids": ids}], greedy(1, prompt_logprobs=0), use_tqdm=False)[0]
    err = (vllm_prompt_logprobs(out, ids) - want_lp).abs()
    assert err.max().item() < tol, f"prompt logprob error {err.max().item():.2e} at {int(err.argmax()) + 1}"
    out = llm.generate([{"prompt_token_ids": ids}], greedy(len(new_tokens)), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == new_tokens


def shard_report(worker) -> dict:
    """Run on every worker through collective_rpc: what this rank holds of each kind of layer."""
    from vllm.distributed import get_tensor_model_parallel_rank
    m = worker.model_runner.model
    layers = list(m.model.layers)
    kda = next(l.self_attn for l in layers if hasattr(l.self_attn, "A_log"))
    mla = next(l.self_attn for l in layers if hasattr(l.self_attn, "kv_b_proj"))
    moe = next(l.block_sparse_moe for l in layers if hasattr(l, "block_sparse_moe"))
    return {
        "rank": get_tensor_model_parallel_rank(),
        "kda_heads": kda.heads, "kda_A_log": tuple(kda.A_log.shape),
        "kda_dt_bias": tuple(kda.dt_bias.shape), "kda_conv": tuple(kda.qkv_conv1d.weight.shape),
        "kda_in_proj": list(kda.in_proj.output_partition_sizes),
        "kda_f_b_out": kda.f_b_proj.output_size_per_partition,
        "kda_o_in": kda.o_proj.input_size_per_partition,
        "mla_q_out": mla.q_proj.output_size_per_partition,
        "mla_kv_b_out": mla.kv_b_proj.output_size_per_partition,
        "mla_kv_a_out": mla.kv_a_proj_with_mqa.output_size,
        "mla_o_in": mla.o_proj.input_size_per_partition,
        "moe_local_experts": moe.experts.routed_experts.local_num_experts,
        "moe_intermediate": moe.experts.routed_experts.intermediate_size_per_partition,
        "embed_rows": m.model.embed_tokens.num_embeddings_per_partition,
        "lm_head_rows": m.lm_head.num_embeddings_per_partition,
        "moe_interface": moe_interface(m),
    }


def moe_interface(model) -> dict:
    """What vLLM's expert-parallel load balancer reads off the model (MixtureOfExperts)."""
    from vllm.model_executor.models.interfaces import is_mixture_of_experts
    layers = list(model.model.layers)
    runners = [l.block_sparse_moe.experts for l in layers if hasattr(l, "block_sparse_moe")]
    return {"is_moe": is_mixture_of_experts(model),
            "moe_layers_are_the_runners": [id(r) for r in model.moe_layers] == [id(r) for r in runners],
            "expert_weight_tensors": [len(list(r.get_expert_weights())) for r in model.moe_layers],
            **{k: getattr(model, k) for k in (
                "num_moe_layers", "num_expert_groups", "num_logical_experts", "num_physical_experts",
                "num_local_physical_experts", "num_routed_experts", "num_shared_experts",
                "num_redundant_experts")}}
