"""The published checkpoint layout without a server: the builder's --published-layout files, the
plugin's tokenizer against an independent reference of the published algorithm
(tests/reference/kimi_tokenizer_ref.py; and the published tokenization_kimi.py itself when
KIMI_PUBLISHED_TOKENIZER points at a copy), the tokenizer mode vLLM picks, and the start-up errors
for a broken shard index or tokenizer files that disagree with config.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reference.kimi_tokenizer_ref import ReferenceTokenizer, cut_points, published_tokenizer
from vllm_kimi_linear.checkpoint import safetensors_shapes
from vllm_kimi_linear.config import KimiLinearDims
from vllm_kimi_linear.tokenizer import KimiLinearTokenizer
from vllm_kimi_linear.tools.published import SPECIAL_OFFSETS, build_published_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Fresh texts (none is in the builder's corpus): Chinese with and without spaces, mixed scripts,
# CamelCase, contractions, emoji, code, long runs (cut at 25,000) and special-token text.
TEXTS = [
    "上海的天气今天不错，我们下午去图书馆看书。",
    "机器 学习 需要 数据 和 计算",
    "模型Model学习learning中文Chinese混合mixed",
    "parseHTTPHeaderValue convertToJSONString myVariableName",
    "I'm sure they'd've said it's fine; DON'T worry, we'll see.",
    "Launch 🚀 in 3, 2, 1 🎉🎉 done👍ok",
    "def getUserId(self):\n\treturn self._userId  # 用户\r\n",
    "x" + " " * 30001 + "end",
    "a\n" + " " * 25003 + "b",
    "tokens" * 5001,
    "It's the UserName of TheModel",
    "\n\n\n   \t  \n",
    "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>",
    "text[BOS]more<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>[PAD]",
    "numbers 1234567 3.14159 and ½ ¼ ① ② Ⅻ",
    "Ελληνικά кириллица العربية עברית हिन्दी 日本語のテキスト 한국어",
]


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory) -> Path:
    return build_published_checkpoint(tmp_path_factory.mktemp("published") / "kimi-linear-published")


@pytest.fixture(scope="module")
def ours(published_dir):
    return KimiLinearTokenizer.from_pretrained(published_dir)


@pytest.fixture(scope="module")
def reference(published_dir):
    return ReferenceTokenizer(published_dir)


# ------------------------------------------------------------------------------ the layout

def test_layout_files(published_dir):
    d = published_dir
    cfg = json.loads((d / "config.json").read_text())
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    assert not (d / "tokenizer.json").exists() and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    # every tensor the config implies is in the shard the index names, nothing else
    expected = KimiLinearDims.from_config(cfg).checkpoint_shapes()
    assert set(index["weight_map"]) == set(expected) == set(safetensors_shapes(d))
    for f in shards:
        mine = {n for n, s in index["weight_map"].items() if s == f}
        assert set(safetensors_shapes_of(d / f)) == mine
    # ids relative to the vocabulary as published: 163584 base tokens, bos +0, eos <|im_end|> +2,
    # pad +255, vocab_size = base + 256
    base = sum(1 for line in (d / "tiktoken.model").read_text().splitlines() if line)
    assert cfg["vocab_size"] == base + 256
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (base, base + 2, base + 255)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == base + 2
    names = {int(i) - base: t["content"] for i, t in tcfg["added_tokens_decoder"].items()}
    assert names == SPECIAL_OFFSETS and names[17] == "<|im_middle|>"


def safetensors_shapes_of(path: Path) -> dict:
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return {k: v for k, v in json.loads(path.read_bytes()[8:8 + n]).items() if k != "__metadata__"}


def test_cli_builds_the_same_files(published_dir, tmp_path):
    out = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "vllm_kimi_linear.tools.builder", str(out),
                        "--published-layout"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "4 shards" in r.stdout
    for f in sorted(p.name for p in published_dir.iterdir()):
        assert (out / f).read_bytes() == (published_dir / f).read_bytes(), f


# ---------------------------------------------------------------------------- tokenization

def test_cut_points_reference():
    # the published cut: a run's 25,001st character starts a new piece (runs counted per
    # 400,000-character piece)
    assert cut_points("a" * 25000) == [] and cut_points("a" * 25001) == [25000]
    assert cut_points("b " + " " * 50001) == [25001, 50001]  # the run starts at 1


def test_ids_equal_the_reference(ours, reference):
    for t in TEXTS:
        assert ours.encode(t) == reference.encode(t), t[:40]


def test_decode_round_trips(ours, reference):
    for t in TEXTS:
        ids = reference.encode(t)
        assert ours.decode(ids) == t == reference.decode(ids), t[:40]
        # token strings (what the server's incremental detokenizer joins) give the text back too
        assert ours.convert_tokens_to_string(ours.convert_ids_to_tokens(ids)) == t


def test_every_special_token_is_one_id(ours, reference):
    assert len(reference.specials) == 258
    for text, i in reference.specials.items():
        assert ours.encode(text) == [i] == reference.encode(text), text
        assert ours.decode([i]) == text
    assert ours.decode(ours.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_the_split_pattern_matters(published_dir, reference):
    """transformers' own conversion of tiktoken.model (what serving without the plugin's
    tokenizer and without remote code gets) differs on this corpus: the tiktoken.model's merges
    cross the published pattern's boundaries, so the comparisons above can fail."""
    from transformers import AutoTokenizer

    generic = AutoTokenizer.from_pretrained(str(published_dir))
    differ = [t[:30] for t in TEXTS if generic.encode(t, add_special_tokens=False) != reference.encode(t)]
    print(f"transformers' conversion differs on {len(differ)} of {len(TEXTS)} texts")
    assert len(differ) >= 6, differ


@pytest.mark.skipif(not os.environ.get("KIMI_PUBLISHED_TOKENIZER"),
                    reason="needs KIMI_PUBLISHED_TOKENIZER=path of the published tokenization_kimi.py")
def test_ids_equal_the_published_file(ours, published_dir, tmp_path):
    # tiktoken caches tiktoken.model by path: give the published loader a fresh one
    d = tmp_path / "copy"
    shutil.copytree(published_dir, d)
    pub = published_tokenizer(os.environ["KIMI_PUBLISHED_TOKENIZER"], d)
    for t in TEXTS:
        assert ours.encode(t) == pub.encode(t), t[:40]
        assert ours.decode(pub.encode(t)) == t


def test_chat_template_renders_the_kimi_format(ours):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>")
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = ours.apply_chat_template(
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "", "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}],
        tools=tools, add_generation_prompt=True)
    assert text == (
        '<|im_system|>tool_declare<|im_middle|>[{"function": {"name": "get_weather", "parameters": '
        '{"type": "object"}}, "type": "function"}]<|im_end|>'  # keys sorted, as published
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>")
