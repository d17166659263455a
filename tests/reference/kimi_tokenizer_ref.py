"""An independent reference of the published Kimi tokenizer algorithm, on Hugging Face `tokenizers`.

The published tokenizer is `tokenization_kimi.py` (TikTokenTokenizer) of
moonshotai/Kimi-Linear-48B-A3B-Instruct (MIT license): tiktoken's BPE over `tiktoken.model`'s
ranks with the split pattern below, 256 + 2 reserved special ids after the base vocabulary
(named by tokenizer_config.json's added_tokens_decoder, else `<|reserved_token_{id}|>`), the input
cut into 400,000-character pieces and each of those wherever a run of whitespace or of
non-whitespace (Python's str.isspace) passes 25,000 characters, every piece encoded with all
special-token text allowed. That file's code is not copied here; this module re-states those
facts and runs them on a different engine than the plugin's (which uses tiktoken and its
fancy-regex): Rust `tokenizers`, with its Oniguruma regex, the BPE merges that transformers'
TikTokenConverter derives from the ranks, and `tokenizers`' own added-token matching. The cut
points are computed per run (itertools.groupby), not with the plugin's running counter.

`PUBLISHED_PAT` is the published pattern (a fact of the file, as a tokenizer needs it to be
compatible). To check against the published file itself, set KIMI_PUBLISHED_TOKENIZER to a
downloaded tokenization_kimi.py (tests/test_published_tokenizer.py then compares with it too).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

PUBLISHED_PAT = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
RESERVED = 256 + 2
PIECE, RUN = 400_000, 25_000


def cut_points(text: str) -> list[int]:
    """Where the published encoder cuts `text` before encoding."""
    cuts = []
    for start in range(0, len(text), PIECE):
        chunk = text[start:start + PIECE]
        pos = start
        for _, group in itertools.groupby(chunk, key=str.isspace):
            n = len(list(group))
            cuts += [pos + k for k in range(RUN, n, RUN)]  # the run's 25,001st char starts a piece
            pos += n
        if start:
            cuts.append(start)
    return sorted(set(cuts))


class ReferenceTokenizer:
    def __init__(self, model_dir):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        d = Path(model_dir)
        base = TikTokenConverter(vocab_file=str(d / "tiktoken.model"), pattern=PUBLISHED_PAT)
        self.num_base = len(base.extract_vocab_merges_from_model(str(d / "tiktoken.model"))[0])
        tok: Tokenizer = base.converted()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PUBLISHED_PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        names = {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()}
        self.specials = {names.get(i, f"<|reserved_token_{i}|>"): i
                         for i in range(self.num_base, self.num_base + RESERVED)}
        # added in id order, so tokenizers gives each the id the published file gives it
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, _ in sorted(self.specials.items(), key=lambda x: x[1])])
        assert all(tok.token_to_id(t) == i for t, i in self.specials.items())
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        bounds = [0, *cut_points(text), len(text)]
        ids: list[int] = []
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                ids += self.tok.encode(text[a:b], add_special_tokens=False).ids
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def published_tokenizer(path: str, model_dir):
    """The published TikTokenTokenizer from a downloaded tokenization_kimi.py (its transformers
    4.x import of bytes_to_unicode redirected to where transformers 5 keeps it)."""
    import importlib.util
    import sys
    import types

    from tokenizers import AddedToken
    from transformers import convert_slow_tokenizer

    shim = types.ModuleType("transformers.models.gpt2.tokenization_gpt2")
    shim.bytes_to_unicode = convert_slow_tokenizer.bytes_to_unicode
    saved = sys.modules.get(shim.__name__)
    sys.modules[shim.__name__] = shim
    try:
        spec = importlib.util.spec_from_file_location("published_tokenization_kimi", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules[shim.__name__]
        else:
            sys.modules[shim.__name__] = saved
    d = Path(model_dir)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    added = {int(i): AddedToken(t["content"], special=True, normalized=False)
             for i, t in cfg["added_tokens_decoder"].items()}
    return mod.TikTokenTokenizer(str(d / "tiktoken.model"), bos_token=cfg["bos_token"],
                                 eos_token=cfg["eos_token"], unk_token=cfg["unk_token"],
                                 pad_token=cfg["pad_token"], added_tokens_decoder=added)
