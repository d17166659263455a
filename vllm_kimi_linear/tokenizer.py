"""The Kimi Linear tokenizer as published, for vLLM: tiktoken.model + tokenizer_config.json.

The published checkpoint ships no tokenizer.json: its tokenizer is `tokenization_kimi.py`'s
TikTokenTokenizer (remote code). Without --trust-remote-code, transformers converts
tiktoken.model itself with a generic split pattern, which tokenizes Chinese, CamelCase and long
whitespace differently. This module owns a faithful re-implementation of the published
algorithm as a vLLM tokenizer (registered as tokenizer mode "kimi_linear" by `register()`, and
picked for kimi_linear checkpoints that ship tiktoken.model by the config hook):

- byte-level BPE over tiktoken.model's ranks (base64 token, rank per line), with the published
  split pattern (runs of Han characters kept apart, CamelCase words split, contractions kept);
- 256 + 2 reserved special ids after the base vocabulary, named by tokenizer_config.json's
  added_tokens_decoder, the rest "<|reserved_token_{id}|>" (the published file reserves 258);
- text is cut into 400,000-character pieces, each into runs of at most 25,000 whitespace or
  non-whitespace characters, before encoding (the published workaround for tiktoken's limits);
- special-token text in the input is encoded as the special token;
- tokens as strings (get_vocab, convert_ids_to_tokens) are GPT-2 byte-level strings, as published.

It also checks the tokenizer files against config.json at start-up (`check_tokenizer_files`).
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
NUM_RESERVED_SPECIAL_TOKENS = 256
# tokenization_kimi.py reserves 256 + 2 ids after the base vocabulary (the model's embedding
# holds the first 256 of them: vocab_size = base + 256)
NUM_SPECIAL_IDS = NUM_RESERVED_SPECIAL_TOKENS + 2
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# The published split pattern (tokenization_kimi.py's pat_str), one alternative per line.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


class KimiTokenizerFileError(ValueError):
    """A tokenizer file is malformed or disagrees with config.json; the message names the file."""


def load_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model -> {token bytes: rank}; ranks must be 0..N-1 (the ids of the base vocab)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise KimiTokenizerFileError(
                f"{path}: line {n} is not '<base64 token> <rank>': the file is not a tiktoken "
                "BPE file; replace it with the checkpoint's own tiktoken.model") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise KimiTokenizerFileError(
            f"{path}: ranks are not 0..{len(ranks) - 1} each once: replace it with the "
            "checkpoint's own tiktoken.model")
    return ranks


def read_tokenizer_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KimiTokenizerFileError(f"{path} is not valid JSON ({e})") from None


def special_tokens(config: dict, num_base: int) -> dict[str, int]:
    """{text: id} of the 258 special ids after the base vocabulary, named as published."""
    names = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
    return {names.get(i, f"<|reserved_token_{i}|>"): i
            for i in range(num_base, num_base + NUM_SPECIAL_IDS)}


@functools.cache
def byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what token strings are made of)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def split_runs(text: str) -> Iterator[str]:
    """Pieces of at most MAX_ENCODE_CHARS, each cut so that no run of whitespace or of
    non-whitespace is longer than MAX_RUN_CHARS (the published pre-split, character-exact)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        s = text[start:start + MAX_ENCODE_CHARS]
        run, run_is_space = 0, s[0].isspace() if s else False
        cut = 0
        for i, ch in enumerate(s):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run, run_is_space = 1, is_space
            else:
                run += 1
                if run > MAX_RUN_CHARS:
                    yield s[cut:i]
                    cut, run = i, 1
        yield s[cut:]


def local_dir(name_or_path, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory, or a Hub repository's non-weight files fetched the way vLLM fetches them
    for its HF tokenizer (the repository name back if that fails: callers then find no file)."""
    if Path(str(name_or_path)).exists():
        return Path(str(name_or_path))
    from vllm.transformers_utils.repo_utils import get_non_weight_snapshot_path
    return Path(get_non_weight_snapshot_path(str(name_or_path), revision=revision,
                                             cache_dir=download_dir))


def check_tokenizer_files(model_dir, vocab_size: int, token_ids: dict[str, int]) -> None:
    """tiktoken.model and tokenizer_config.json against config.json: the base vocabulary plus the
    256 reserved ids fit the model's vocab_size, every added token's id is a reserved id, and
    config.json's bos/eos/pad ids are special ids. One KimiTokenizerFileError naming the file."""
    d = Path(model_dir)
    if not (d / VOCAB_FILE).is_file():
        return
    num_base = len(load_ranks(d / VOCAB_FILE))
    if num_base + NUM_RESERVED_SPECIAL_TOKENS > vocab_size:
        raise KimiTokenizerFileError(
            f"{d / VOCAB_FILE} has {num_base} tokens, which with the {NUM_RESERVED_SPECIAL_TOKENS} "
            f"reserved special tokens need {num_base + NUM_RESERVED_SPECIAL_TOKENS} ids, but "
            f"config.json says vocab_size {vocab_size}: the tokenizer is not this model's")
    cfg = read_tokenizer_config(d)
    for i, tok in cfg.get("added_tokens_decoder", {}).items():
        if not num_base <= int(i) < num_base + NUM_SPECIAL_IDS:
            raise KimiTokenizerFileError(
                f"{d / CONFIG_FILE}: added token {tok.get('content')!r} has id {i}, outside the "
                f"special ids {num_base}..{num_base + NUM_SPECIAL_IDS - 1} that follow "
                f"{VOCAB_FILE}'s {num_base} tokens: the two files do not belong together")
    for field, tid in token_ids.items():
        if tid is not None and not num_base <= tid < vocab_size:
            raise KimiTokenizerFileError(
                f"config.json: {field} {tid} is not a special token id of {d / VOCAB_FILE} "
                f"({num_base}..{vocab_size - 1}): the tokenizer files are not this model's")


class KimiLinearTokenizer:
    """vLLM TokenizerLike over tiktoken with the published Kimi algorithm (module docstring)."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, trust_remote_code: bool = False,
                        revision: str | None = None, download_dir: str | None = None,
                        **kwargs) -> "KimiLinearTokenizer":
        d = local_dir(path_or_repo_id, revision, download_dir)
        if not (d / VOCAB_FILE).is_file():
            raise KimiTokenizerFileError(
                f"tokenizer mode 'kimi_linear' needs {VOCAB_FILE}; {path_or_repo_id} has none "
                "(give the checkpoint's directory or Hub id, or use --tokenizer-mode hf)")
        return cls(d, truncation_side=kwargs.get("truncation_side", "left"))

    def __init__(self, model_dir: Path, truncation_side: str = "left"):
        import tiktoken

        self.name_or_path = str(model_dir)
        self._truncation_side = truncation_side
        ranks = load_ranks(model_dir / VOCAB_FILE)
        self.num_base = len(ranks)
        config = read_tokenizer_config(model_dir)
        self._special = special_tokens(config, self.num_base)
        self._enc = tiktoken.Encoding(name=VOCAB_FILE, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self._special)
        be = byte_encoder()
        self._id_to_token = {i: "".join(be[b] for b in tok) for tok, i in ranks.items()}
        self._id_to_token |= {i: "".join(be[b] for b in t.encode()) for t, i in self._special.items()}
        self._vocab = {t: i for i, t in self._id_to_token.items()}
        self._max_chars = max(len(t) for t in self._vocab)
        self._byte_decoder = {c: b for b, c in be.items()}
        self._chat_template = config.get("chat_template")
        jinja = model_dir / "chat_template.jinja"
        if self._chat_template is None and jinja.is_file():
            self._chat_template = jinja.read_text(encoding="utf-8")

        def special_id(key: str) -> int | None:
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return self._special.get(tok) if tok is not None else None

        self._bos, self._eos = special_id("bos_token"), special_id("eos_token")
        self._pad, self._unk = special_id("pad_token"), special_id("unk_token")
        # The published file reserves 258 special ids but the model embeds 256 of them
        # (config.json vocab_size): vLLM admits prompt ids up to max(tokenizer, model) - 1, so
        # the two extra ids must not count, or their text would reach the embedding out of range.
        vocab_size = _model_vocab_size(model_dir)
        self._max_token_id = min(self._enc.n_vocab, vocab_size or self._enc.n_vocab) - 1

    # ------------------------------------------------------------------------- properties
    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._special)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._special.values())

    bos_token_id = property(lambda self: self._bos)
    eos_token_id = property(lambda self: self._eos)
    pad_token_id = property(lambda self: self._pad)
    is_fast = property(lambda self: False)
    vocab_size = property(lambda self: self._enc.n_vocab)
    max_token_id = property(lambda self: self._max_token_id)
    truncation_side = property(lambda self: self._truncation_side)

    @property
    def max_chars_per_token(self) -> int:
        return self._max_chars


    def __len__(self) -> int:
        return self._enc.n_vocab

    def __hash__(self) -> int:
        return hash(id(self))

    def num_special_tokens_to_add(self) -> int:
        return 0  # the published tokenizer adds no BOS/EOS when encoding

    def get_vocab(self) -> dict[str, int]:
        # one shared dict, as vLLM's cached HF tokenizer returns: parsers read it per request
        return self._vocab

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._special)

    # ---------------------------------------------------------------------- encode/decode
    def encode(self, text: str, truncation: bool | None = None, max_length: int | None = None,
               add_special_tokens: bool = True, **kwargs) -> list[int]:
        ids: list[int] = []
        for piece in split_runs(text):
            ids.extend(self._enc.encode(piece, allowed_special="all"))
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:] if self._truncation_side == "left" else ids[:max_length]
        return ids

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: int | None = None, **kwargs):
        from transformers import BatchEncoding

        if text_pair is not None:
            raise NotImplementedError("text_pair is not supported by the Kimi Linear tokenizer")
        batch = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, truncation=truncation, max_length=max_length) for t in batch]
        if isinstance(text, str):
            return BatchEncoding({"input_ids": ids[0], "attention_mask": [1] * len(ids[0])})
        return BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base]
        return self._enc.decode(ids, errors="replace")

    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
        return [self._id_to_token.get(i, "") for i in ids
                if not (skip_special_tokens and i >= self.num_base)]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self._unk)
        return [self._vocab.get(t, self._unk) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytes(self._byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------- chat
    def get_chat_template(self, chat_template: str | None, tools=None) -> str | None:
        return chat_template if chat_template is not None else self._chat_template

    def apply_chat_template(self, messages=None, tools: list[dict[str, Any]] | None = None,
                            chat_template: str | None = None, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        from transformers.utils import chat_template_utils as hf_chat_utils

        conversation = messages if messages is not None else kwargs.pop("conversation", None)
        if conversation is None:
            raise ValueError("apply_chat_template needs messages")
        template = self.get_chat_template(chat_template)
        if template is None:
            raise ValueError(f"{self.name_or_path}: no chat template in {CONFIG_FILE}; pass "
                             "--chat-template")
        # as published: tools are rendered with their keys sorted (deep_sort_dict)
        rendered, _ = hf_chat_utils.render_jinja_template(
            [conversation], chat_template=template, tools=_deep_sort(tools), **kwargs)
        prompt = rendered[0]
        return self.encode(prompt) if tokenize else prompt


def _deep_sort(obj):
    if isinstance(obj, dict):
        return {k: _deep_sort(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [_deep_sort(v) for v in obj]
    return obj


def _model_vocab_size(model_dir: Path) -> int | None:
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
