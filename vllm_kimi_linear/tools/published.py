"""The tiny model in the published checkpoint's layout (moonshotai/Kimi-Linear-48B-A3B-Instruct).

This module owns what differs from the builder's default layout:
- weights in `model-0000N-of-0000M.safetensors` shards with `model.safetensors.index.json`;
- a tiktoken tokenizer: `tiktoken.model` (base64 token + rank per line) of a byte-level BPE
  trained here with NO pre-split, so its merges cross the boundaries the published split pattern
  keeps (Han/Latin, CamelCase, word/space, digits), and a tokenizer that ignored that pattern
  would tokenize differently; 256 reserved special tokens after it with the published names at
  the published offsets (bos +0, `<|im_end|>` +2, `<|im_middle|>` +17, tool-call tokens
  +11..+15, pad +255), `tokenizer_config.json` with `auto_map` -> tokenization_kimi.TikTokenTokenizer
  and `special_tokens_map.json`;
- the Kimi chat format (`<|im_system|>system<|im_middle|>...<|im_end|>`, tool declarations,
  Kimi-K2 tool calls, tool results as "## Return of <id>") as a chat template of our own writing;
- config.json with `auto_map` for configuration_kimi.py / modeling_kimi.py and the published
  token ids (bos = base, eos = `<|im_end|>`, pad = base + 255, vocab_size = base + 256).
The remote-code files themselves (tokenization_kimi.py, modeling_kimi.py, ...) are not written:
the plugin serves without them.

    python -m vllm_kimi_linear.tools.builder OUTDIR --published-layout [--shards 4] [options]
"""
from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

from .builder import DTYPES, TinyOptions, make_config, make_tensors
from .tokenizer import CORPUS, MAX_CONTEXT, write_json

NUM_RESERVED = 256
# Special tokens at their published offsets from the base vocabulary size (163584 published)
SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
    17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}
ADDITIONAL = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
              "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]
AUTO_MAP_CONFIG = {"AutoConfig": "configuration_kimi.KimiLinearConfig",
                   "AutoModel": "modeling_kimi.KimiLinearModel",
                   "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"}
AUTO_MAP_TOKENIZER = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

# Kimi's chat format (the Kimi-K2 family's, which Kimi Linear's Instruct model uses).
CHAT_TEMPLATE = (
    "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- elif c -%}"
    "{%- for p in c -%}{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM + "<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set name = m.get('name') or m['role'] -%}"
    "{%- if m['role'] == 'user' -%}<|im_user|>{{ name }}<|im_middle|>"
    "{%- elif m['role'] == 'assistant' -%}<|im_assistant|>{{ name }}<|im_middle|>"
    "{%- else -%}<|im_system|>{{ name }}<|im_middle|>{%- endif -%}"
    "{%- if m['role'] == 'tool' -%}## Return of {{ m['tool_call_id'] }}\n{{ text(m['content']) }}"
    "{%- else -%}{{ text(m['content']) }}{%- endif -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}<|tool_calls_section_begin|>"
    "{%- for tc in m['tool_calls'] -%}<|tool_call_begin|>{{ tc['id'] }}<|tool_call_argument_begin|>"
    "{%- set args = tc['function']['arguments'] -%}"
    "{{ args if args is string else args | tojson }}<|tool_call_end|>{%- endfor -%}"
    "<|tool_calls_section_end|>{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

# Text the BPE learns from besides the English CORPUS: Chinese with and without spaces, mixed
# scripts, CamelCase identifiers, contractions, emoji and code, repeated so merges span them.
EXTRA_CORPUS = """\
你好世界，今天天气很好。我们一起去公园散步吧。机器学习模型需要大量的数据和计算资源。
你好 世界 今天 天气 很好 我们 一起 学习 中文 和 English 混合 文本 Kimi模型 线性注意力
北京是中国的首都。上海是一个国际化的大城市。长上下文推理需要高效的注意力机制。
getHTTPResponseCode parseJSONValue KimiLinearForCausalLM TikTokenTokenizer XMLHttpRequest
fooBarBaz camelCaseWord PascalCaseWord snake_case_word getUserName setUserName isReady
TheQuickBrownFox JumpsOverTheLazyDog HelloWorld MyClassName YourFunctionName OurModelName
Kimi模型在English文本中表现good，中文和English混合Text，模型Model注意力Attention
don't won't can't it's I'm you're we've they'll she'd DON'T It'S We'Re
😀 😃 😄 🚀🚀🚀 ✨ 👍👍 🎉 emoji😀text 表情😀符号
    def forward(self, hiddenStates, attentionMask=None):  # 前向计算
        return self.outputProj(hiddenStates) + 12345 * 0.5
x = [1, 22, 333, 4444, 55555]; y = {"key": "值", 'kimi': True}
\t\tif (a != b && c <= d) { return a->b; }\r\n
"""


def boundary_merges(ranks: dict[bytes, int]) -> list[bytes]:
    """Tokens that join what the published split pattern keeps apart, each the concatenation of
    two tokens already there (so tiktoken's BPE can reach it): lower+Upper letters (CamelCase),
    space+Han and Han+space, Han+Latin and Latin+Han, and "n'" / "n't" (contractions)."""
    han = sorted((t for t in ranks if len(t) == 3 and "\u4e00" <= t.decode("utf-8", "ignore") <= "\u9fff"),
                 key=ranks.get)[:24]
    pairs = [(bytes([lo]), bytes([up])) for lo in b"aeinorst" for up in b"ABCDEFGHIKLMNOPRSTVW"]
    pairs += [(b" ", h) for h in han] + [(h, b" ") for h in han]
    pairs += [(h, bytes([c])) for h in han[:8] for c in b"aeiMKE"]
    pairs += [(bytes([c]), h) for h in han[:8] for c in b"aeiltd"]
    pairs += [(b"n", b"'"), (b"n'", b"t"), (b"y", b"'"), (b"y'", b"ll")]
    out = []
    for a, b in pairs:
        if a in ranks and b in ranks and a + b not in ranks and a + b not in out:
            out.append(a + b)
    return out


def train_ranks(num_base: int) -> dict[bytes, int]:
    """A byte-level BPE of exactly `num_base` tokens: the 256 bytes, `boundary_merges`, then the
    merges trained on whole lines in training order (rank = order; tiktoken's BPE applies merges
    by rank)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    lines = (CORPUS + EXTRA_CORPUS * 8).splitlines(keepends=True)

    def train(size: int) -> dict[bytes, int]:
        trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=1, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(lines, trainer=trainer)
        if tok.get_vocab_size() != size:
            raise ValueError(f"the embedded corpus trains {tok.get_vocab_size()} BPE tokens, "
                             f"{size} requested; use a smaller --vocab")
        return {bytes(byte_of[c] for c in t): i for t, i in tok.get_vocab().items()}

    # the boundary tokens depend on which Han characters were learned: train once to find them,
    # then again leaving room for them (same corpus, so the same first merges)
    n_extra = len(boundary_merges(train(num_base)))
    for _ in range(6):
        ranks = train(num_base - n_extra)
        extra = boundary_merges(ranks)
        if len(extra) >= n_extra:
            break
        n_extra = len(extra)  # fewer boundary tokens than room left: train more merges
    else:
        raise ValueError(f"cannot build exactly {num_base} BPE tokens; try another --vocab")
    if n_extra == 0 or len(extra) > num_base // 2:
        raise ValueError(f"--vocab {num_base + NUM_RESERVED} is too small for the published layout")
    # ranked right after the 256 bytes: merged before any trained pair, so a tokenizer that
    # does not split where the published pattern does produces them in ordinary text
    out = {t: r for t, r in ranks.items() if r < 256}
    out |= {t: 256 + k for k, t in enumerate(extra[:n_extra])}
    return out | {t: r + n_extra for t, r in ranks.items() if r >= 256}


def write_tokenizer(out: Path, num_base: int) -> dict[str, int]:
    """tiktoken.model, tokenizer_config.json, special_tokens_map.json; returns bos/eos/pad ids."""
    ranks = train_ranks(num_base)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    added = {str(num_base + k): {"content": t, "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False, "special": True}
             for k, t in SPECIAL_OFFSETS.items()}
    special = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": added, "additional_special_tokens": ADDITIONAL,
        "auto_map": AUTO_MAP_TOKENIZER, **special, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "extra_special_tokens": {},
        "model_max_length": MAX_CONTEXT, "tokenizer_class": "TikTokenTokenizer"})
    write_json(out / "special_tokens_map.json", special | {"additional_special_tokens": ADDITIONAL})
    by_name = {t: num_base + k for k, t in SPECIAL_OFFSETS.items()}
    return {"bos": by_name["[BOS]"], "eos": by_name["<|im_end|>"], "pad": by_name["[PAD]"]}


def write_shards(out: Path, tensors: dict, shards: int) -> None:
    """Consecutive tensors (in name order) into `shards` files of about equal bytes, and the index
    mapping each tensor to its file, as `save_pretrained` writes them."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n in names:
        groups[min(shards - 1, int(acc * shards / total))].append(n)
        acc += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)
        weight_map |= {n: fname for n in group}
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_published_checkpoint(out_dir, shards: int = 4, **options) -> Path:
    """The tiny model (TinyOptions `options`; vocab = base BPE + 256 reserved) in the published
    layout, written to out_dir."""
    unknown = set(options) - {f.name for f in dataclasses.fields(TinyOptions)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    o = TinyOptions(**options)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, o.vocab - NUM_RESERVED)
    cfg = make_config(o, o.vocab, ids)
    cfg["auto_map"] = AUTO_MAP_CONFIG
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", {
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
        "max_length": MAX_CONTEXT})
    tensors = make_tensors(cfg, o.seed, DTYPES[o.dtype])
    write_shards(out, tensors, min(shards, len(tensors)))
    return out


def describe(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = index["metadata"]["total_size"]
    return (f"wrote {path}: published layout, {len(files)} shards ({n / 2 ** 20:.1f} MiB), "
            f"tiktoken.model of {cfg['vocab_size'] - NUM_RESERVED} tokens + {NUM_RESERVED} reserved, "
            f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}; serve it without "
            "--trust-remote-code")
