"""Checkpoint and config variants the published model family has, served with vLLM's defaults and
checked token for token against the independent reference:

* no KDA layer (every layer MLA: the baseline users build to compare against), prefix caching on:
  a repeated prompt hits the prefix cache (as a hybrid, vLLM's runner died at the first request:
  "no mamba layers in the model");
* A_log stored [H] instead of [1, 1, H, 1], and multi-token-prediction layers after the decoder
  (num_nextn_predict_layers = 1), which serving skips."""
from __future__ import annotations

import json
import shutil

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


def test_a_log_1d_and_mtp_layers_serve_like_the_published_layout(tiny_model_dir, reference_model, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "variant"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    w = load_file(str(d / "model.safetensors"))
    a_logs = [n for n in w if n.endswith(".A_log")]
    assert a_logs
    for n in a_logs:
        w[n] = w[n].reshape(-1).clone()
    # an MTP block as checkpoints store it: a decoder layer's tensors at index L, plus its own
    mtp = {n.replace("model.layers.0.", f"model.layers.{L}.", 1): t.clone()
           for n, t in w.items() if n.startswith("model.layers.0.")}
    mtp[f"model.layers.{L}.eh_proj.weight"] = w["lm_head.weight"][:8].clone()
    save_file(w | mtp, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    ids = prompt(200, salt=13)
    with kimi_llm(d, max_model_len=1024, max_num_seqs=2) as llm:
        out = llm.generate([{"prompt_token_ids": ids}], greedy(8), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == ref.greedy_generate(reference_model, ids, 8)
