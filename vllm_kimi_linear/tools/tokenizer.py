"""The tiny model's tokenizer: a byte-level BPE trained on the text embedded below, with the
published special tokens appended last (as the published ids are), and its chat template.

No download: the same vocab size gives the same tokenizer files. Used by `builder.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_CONTEXT = 131072  # model_max_length of the tiny model (the published one says 1048576)

BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Appended after the learned vocabulary, like the published ids (bos 163584 ... pad 163839).
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, "<|im_system|>", "<|im_user|>",
                  "<|im_assistant|>", PAD]
# The chat model's turn ends with <|im_end|>, so that is the end-of-sequence token servers
# stop on (the published Instruct config's eos_token_id is likewise <|im_end|>, not [EOS]).
EOS_TOKEN = IM_END
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Kimi Linear is a hybrid attention architecture. Most layers use Kimi Delta Attention, a linear
attention with a gated delta rule and a fine-grained, channel-wise forgetting gate; every fourth
layer uses multi-head latent attention without rotary position embeddings. The recurrent state of
each linear layer is a small matrix per head, so memory does not grow with the length of the
context, while the few global attention layers keep a compressed cache of latent vectors.
Serving a model means batching requests, scheduling prefill and decode steps, managing memory for
caches and states, and streaming tokens back to clients as soon as they are produced.
Once upon a time, in a small village between the mountains and the sea, there lived an old
clockmaker who repaired watches for farmers, fishermen, teachers and travelling merchants. Every
morning she opened the wooden shutters, lit the stove, and listened to the ticking of a hundred
clocks. Children came after school to watch her work with tiny screwdrivers and brass gears.
Weather report: cloudy in the north with light rain, sunny and warm in the south, strong winds
along the coast in the evening. Temperatures between twelve and twenty-four degrees Celsius.
Recipe for bread: mix flour, water, salt and yeast; knead the dough for ten minutes; let it rise
for an hour; shape the loaf; bake at two hundred and twenty degrees until the crust is golden.
The history of computing includes mechanical calculators, vacuum tubes, transistors, integrated
circuits, personal computers, the internet, mobile phones, graphics processors and data centres.
Mathematics studies numbers, shapes, patterns, structures and change. Algebra, geometry, analysis,
probability, statistics and logic are some of its branches. A prime number has exactly two
divisors. The derivative measures how a function changes; the integral accumulates quantities.
Physics describes energy, matter, motion, forces, waves, light, heat, electricity and magnetism.
Chemistry explains how atoms combine into molecules and how reactions transform substances.
Biology explores cells, genes, proteins, organisms, ecosystems, evolution and the diversity of
life on Earth, from bacteria in hot springs to whales in the deep ocean and trees in the forest.
Music has rhythm, melody, harmony and timbre. An orchestra includes violins, violas, cellos,
basses, flutes, oboes, clarinets, bassoons, horns, trumpets, trombones, tubas and percussion.
Geography: rivers flow from springs and glaciers to lakes and oceans; deserts receive little
rain; islands, peninsulas, valleys, plateaus, volcanoes and canyons shape the landscape.
Cities need roads, bridges, railways, airports, harbours, hospitals, schools, libraries, parks,
markets, museums, theatres, power plants and clean water for millions of people.
Question: What is the capital of France? Answer: Paris. Question: How many days are in a week?
Answer: seven. Question: Which planet is known as the red planet? Answer: Mars.
Please summarize the following document in three sentences. Translate this paragraph into
simple English. Write a short poem about autumn leaves. Explain the difference between a list
and a dictionary. Give me five ideas for a birthday party. Thank you very much for your help!
Sure, here is a short answer. I hope this helps. Let me know if you have any other questions.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(i, fibonacci(i))

import json, math, os, sys
class Request:
    def __init__(self, prompt, max_tokens=16, temperature=0.0):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
{"model": "kimi-linear", "messages": [{"role": "user", "content": "hello"}], "stream": true}
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April,
May, June, July, August, September, October, November, December. Spring, summer, autumn, winter.
Red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink, purple, gold.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, hundred, thousand.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 24 32 48 64 100 128 256 512 1000 1024 2048 4096 65536 1048576
Animals: cat, dog, horse, cow, sheep, goat, pig, rabbit, mouse, lion, tiger, bear, wolf, fox,
deer, eagle, owl, sparrow, penguin, dolphin, shark, octopus, turtle, frog, snake, bee, ant.
Food: apple, banana, cherry, grape, lemon, mango, orange, peach, pear, plum, strawberry, tomato,
potato, carrot, onion, garlic, rice, pasta, cheese, butter, milk, eggs, chicken, fish, soup, tea.
Emotions: happy, sad, angry, afraid, surprised, curious, calm, proud, grateful, hopeful, tired.
Verbs: run, walk, jump, swim, read, write, speak, listen, think, learn, build, create, open, close,
start, stop, give, take, make, find, keep, bring, begin, seem, help, show, hear, play, move, live.
The committee reviewed the proposal carefully and decided to postpone the final decision until
additional evidence, independent measurements and a detailed budget had been collected.
Engineers measured throughput, latency, memory usage and accuracy under realistic workloads, and
reported percentiles, averages and confidence intervals together with the exact configuration.
"""

MIN_VOCAB, MAX_VOCAB = 512, 1800


def build_tokenizer(vocab: int):
    """A byte-level BPE trained on CORPUS, `vocab` entries in total (special tokens last)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    learned = vocab - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != learned:
        raise ValueError(f"the embedded corpus trains only {tok.get_vocab_size()} BPE tokens, "
                         f"{learned} requested (vocab={vocab}); use a smaller --vocab")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == vocab
    return tok


def write_tokenizer(tok, out: Path) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json; returns bos/eos/pad ids."""
    tok.save(str(out / "tokenizer.json"))
    ids = {"bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS_TOKEN), "pad": tok.token_to_id(PAD)}
    special = {"bos_token": BOS, "eos_token": EOS_TOKEN, "pad_token": PAD, "unk_token": None}
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS_TOKEN, PAD)],
        "added_tokens_decoder": added,
        "model_max_length": MAX_CONTEXT,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json",
                {k: v for k, v in special.items() if v is not None}
                | {"additional_special_tokens": config["additional_special_tokens"]})
    return ids


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
