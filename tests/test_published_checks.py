"""What vLLM makes of a published-layout checkpoint before serving (in-process, no engine): the
tokenizer mode the plugin picks (with and without --trust-remote-code, and an explicit
--tokenizer-mode kept), and one clear start-up error naming the file for a shard the index lists
but the directory lacks, a tensor the index places in a shard that does not hold it, and
tokenizer files that disagree with config.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_kimi_linear.tools.published import build_published_checkpoint


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory) -> Path:
    return build_published_checkpoint(tmp_path_factory.mktemp("published") / "ckpt", shards=3)


def engine_config(model_dir, **kw):
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(model_dir), dtype="float32", max_model_len=2048, **kw).create_engine_config()


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_published_tokenizer_picked(published_dir, trust_remote_code):
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    from vllm_kimi_linear.tokenizer import KimiLinearTokenizer
    c = engine_config(published_dir, trust_remote_code=trust_remote_code)
    assert c.model_config.tokenizer_mode == "kimi_linear"
    tok = cached_tokenizer_from_config(c.model_config)
    assert isinstance(tok, KimiLinearTokenizer)
    cfg = json.loads((published_dir / "config.json").read_text())
    # 258 ids as published, but none past the model's embedding may reach it
    assert tok.vocab_size == cfg["vocab_size"] + 2 and tok.max_token_id == cfg["vocab_size"] - 1


def test_explicit_tokenizer_mode_kept(published_dir, tiny_model_dir):
    assert engine_config(published_dir, tokenizer_mode="hf").model_config.tokenizer_mode == "hf"
    # the builder's default layout ships tokenizer.json: left to vLLM's HF tokenizer
    assert engine_config(tiny_model_dir).model_config.tokenizer_mode == "auto"


def test_missing_shard_named(published_dir, tmp_path):
    d = broken_copy(published_dir, tmp_path / "c")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard .*model-00002-of-00003\.safetensors is missing"):
        engine_config(d)


def test_tensor_absent_from_its_shard_named(published_dir, tmp_path):
    d = broken_copy(published_dir, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor {name} is listed in model\.safetensors\.index\.json "
                                         rf"as stored in .*{other}, but that file does not contain it"):
        engine_config(d)


def test_tiktoken_model_too_large_for_config_named(published_dir, tmp_path):
    d = broken_copy(published_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] -= 1
    # keep the tensors consistent with the smaller vocab: only the tokenizer disagrees
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tiktoken\.model has \d+ tokens.*config\.json says vocab_size"):
        engine_config(d)


def test_tokenizer_config_from_another_model_named(published_dir, tmp_path):
    d = broken_copy(published_dir, tmp_path / "c")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg["added_tokens_decoder"] = {str(int(k) + 1000): v for k, v in tcfg["added_tokens_decoder"].items()}
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: added token '\[BOS\]' has id \d+, outside"):
        engine_config(d)


def test_malformed_tiktoken_model_named(published_dir, tmp_path):
    d = broken_copy(published_dir, tmp_path / "c")
    (d / "tiktoken.model").write_text("this is not base64!! 0\n")
    with pytest.raises(ValueError, match=r"tiktoken\.model: line 1 is not"):
        engine_config(d)


def test_hub_id_resolved_to_its_files(published_dir, monkeypatch):
    """`vllm serve moonshotai/...`: the mode is picked and the tokenizer loaded from the Hub
    repository's non-weight files, fetched by vLLM's own helper (stubbed here: no network)."""
    import types

    from vllm.transformers_utils import repo_utils

    from vllm_kimi_linear.hooks import pick_tokenizer_mode
    from vllm_kimi_linear.tokenizer import KimiLinearTokenizer

    hub_id = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
    fetched = []
    monkeypatch.setattr(repo_utils, "get_non_weight_snapshot_path",
                        lambda repo, revision=None, cache_dir=None, token=None:
                        fetched.append(repo) or str(published_dir))
    mc = types.SimpleNamespace(tokenizer=hub_id, tokenizer_mode="auto", tokenizer_revision=None)
    pick_tokenizer_mode(mc)
    assert mc.tokenizer_mode == "kimi_linear" and fetched == [hub_id]
    tok = KimiLinearTokenizer.from_pretrained(hub_id)
    assert tok.encode("<|im_middle|>") == [tok.num_base + 17]


def test_kimi_linear_mode_without_tiktoken_model_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--tokenizer-mode kimi_linear needs tiktoken\.model"):
        engine_config(tiny_model_dir, tokenizer_mode="kimi_linear")
