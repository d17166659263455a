"""Chat prompts of an EXACT token count, counted with the served model's own tokenizer and chat
template: the server's POST /tokenize (vLLM; takes `messages`, so the template is counted too) or
a local tokenizer directory (--tokenizer).

How: filler text is a seeded random sequence of words that are ONE token each after a space
(found once by asking the tokenizer). Byte-level BPE tokenizers split text into pre-tokens at word
boundaries (" word"), so n such words add n tokens; the whole prompt is then counted once and the
word count corrected by the difference until it is exact (one or two rounds in practice).
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Protocol

# candidates for one-token filler words (a tokenizer keeps those that are one token after a space)
WORDS = """the of and to in is was for on are with as by at be this from or have an they which
one you were her all she there would their we him been has when who will more no if out so said
what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state
good very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used
take three water light river stone cloud music garden window table paper story number market city
road bridge forest ocean island summer winter spring autumn morning evening night data model token
""".split()
MIN_FILLER_WORDS = 8


class ChatTokenizer(Protocol):
    async def ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat prompt as the server builds it (generation prompt included)."""


class ServerTokenizer:
    """vLLM's POST /tokenize (at the server root, next to /v1) with `messages`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600):
        import httpx

        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = root + "/tokenize"
        self.model = model
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def ids(self, messages: list[dict]) -> list[int]:
        r = await self._client.post(self.url, json={"model": self.model, "messages": messages,
                                                    "add_generation_prompt": True})
        if r.status_code != 200:
            raise RuntimeError(f"POST {self.url} answered {r.status_code}: {r.text[:300]} "
                               "(the server must be vLLM's OpenAI server; or pass --tokenizer DIR)")
        return r.json()["tokens"]

    async def aclose(self) -> None:
        await self._client.aclose()


class LocalTokenizer:
    """A tokenizer directory (or hub name available offline) through transformers."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"tokenizer at {path} has no chat template")

    async def ids(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        return list(out)

    async def aclose(self) -> None:
        pass


@dataclass
class Prompt:
    messages: list[dict]
    tokens: int  # verified with the tokenizer
    head: tuple[int, ...] = ()  # the first prefix_tokens + 1 ids (to check what is shared)


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptBuilder:
    """Builds exact-length prompts. `await setup()` once, then `await build(...)`."""

    def __init__(self, tokenizer: ChatTokenizer, seed: int = 0, max_rounds: int = 8):
        self.tok = tokenizer
        self.seed = seed
        self.max_rounds = max_rounds
        self.words: list[str] = []
        self.overhead = 0  # tokens of the chat template around empty content
        self._hint: dict[tuple, int] = {}  # (key, target, prefix) -> filler words that worked last time
        self._shared: dict[tuple, str] = {}  # (key, prefix_tokens) -> shared content text

    async def setup(self) -> None:
        base = await self.tok.ids(user("Text:"))
        counts = await asyncio.gather(*(self.tok.ids(user("Text:" + f" {w}" * 3)) for w in WORDS))
        self.words = [w for w, c in zip(WORDS, counts) if len(c) - len(base) == 3]
        if len(self.words) < MIN_FILLER_WORDS:
            raise RuntimeError(f"only {len(self.words)} of {len(WORDS)} filler words are one token after a "
                               "space with this tokenizer; exact-length prompts need at least "
                               f"{MIN_FILLER_WORDS}")
        self.overhead = len(await self.tok.ids(user("")))

    def filler(self, rng_seed, n: int) -> str:
        rng = random.Random(repr(rng_seed))
        return "".join(" " + w for w in rng.choices(self.words, k=max(n, 0)))

    async def _fit(self, target: int, make, start: int) -> tuple[list[dict], list[int], int]:
        """Find n with len(ids(make(n))) == target, starting at `start`."""
        n, seen = start, {}
        for _ in range(self.max_rounds):
            msgs = make(n)
            ids = await self.tok.ids(msgs)
            if len(ids) == target:
                return msgs, ids, n
            seen[n] = len(ids)
            step = target - len(ids)
            n = n + step if n + step not in seen else n + (1 if step > 0 else -1)
            if n < 0:
                break
        raise RuntimeError(f"could not build a prompt of exactly {target} tokens (tried word counts "
                           f"{sorted(seen)} -> {[seen[k] for k in sorted(seen)]})")

    async def build(self, target: int, index: int, key: str = "", prefix_tokens: int = 0) -> Prompt:
        """A prompt of exactly `target` tokens, unique to (key, index); with prefix_tokens > 0 its
        first prefix_tokens tokens are the same for every index of the same key."""
        if not self.words:
            raise RuntimeError("PromptBuilder.setup() was not awaited")
        if target <= self.overhead + 1:
            raise ValueError(f"{target} tokens cannot hold a chat prompt: the template alone takes "
                             f"{self.overhead}")
        # the unique part opens with a word that differs between consecutive indexes, so that shared
        # prefixes end where they should; then seeded random words, different per index
        lead = self.words[index % len(self.words)]
        if prefix_tokens:
            shared = await self.shared_prefix(key, prefix_tokens)

            def make(n):
                return user(shared + " " + lead + self.filler((self.seed, key, index), n))
        else:
            head = f"{index}: {lead}"

            def make(n):
                return user(head + self.filler((self.seed, key, index), n))
        hint_key = (key, target, prefix_tokens)
        start = self._hint.get(hint_key, target - self.overhead - (prefix_tokens or 4))
        msgs, ids, n = await self._fit(target, make, max(start, 0))
        self._hint[hint_key] = n
        return Prompt(msgs, len(ids), tuple(ids[:prefix_tokens + 1]) if prefix_tokens else ())

    async def shared_prefix(self, key: str, prefix_tokens: int) -> str:
        """Content text whose prompt's first `prefix_tokens` tokens are fixed for `key`: measured
        as the common prefix of two prompts that differ only after it."""
        if (key, prefix_tokens) in self._shared:
            return self._shared[(key, prefix_tokens)]
        n = max(prefix_tokens - self.overhead, 0)
        for _ in range(self.max_rounds):
            text = self.filler((self.seed, key, "prefix"), n)
            a = await self.tok.ids(user(text + " " + self.words[0] + " " + self.words[1]))
            b = await self.tok.ids(user(text + " " + self.words[1] + " " + self.words[0]))
            got = common_prefix(a, b)
            if got == prefix_tokens:
                self._shared[(key, prefix_tokens)] = text
                return text
            n += prefix_tokens - got
            if n < 0:
                break
        raise RuntimeError(f"could not build a shared prefix of exactly {prefix_tokens} tokens "
                           f"(the chat template alone may be longer)")
