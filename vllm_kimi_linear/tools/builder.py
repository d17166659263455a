"""The embedded default model: a tiny, deterministic, random-weight Kimi Linear checkpoint.

This module owns everything needed to produce a servable model directory with no download:
config.json (the published field set, 1-based layer lists), model.safetensors (the published
tensor names and shapes, see /work/shared/reference/kimi-linear.md), a byte-level BPE tokenizer
trained locally on the text embedded below, and generation_config.json.

    python -m vllm_kimi_linear.tools.builder OUTDIR [--hidden 256] [--layers 4] [--all-mla] ...
    python -m vllm_kimi_linear.tools.builder OUTDIR --layout mla-first    # a named preset (LAYOUTS)
    python -m vllm_kimi_linear.tools.builder OUTDIR --layers 6 --full-attn-layers 1,5 --dense-layers 2
    python -m vllm_kimi_linear.tools.builder OUTDIR --published-config   # 48B dims, no weights
    python -m vllm_kimi_linear.tools.builder OUTDIR --published-layout [--shards 4]  # files as
        published: sharded weights + index, tiktoken.model, Kimi chat template (published.py)

Same options -> byte-identical files: every tensor draws from its own generator seeded by
(seed, tensor name), so a tensor's values do not depend on which other tensors exist, and a
bfloat16 build is exactly the float32 build rounded. It imports no vLLM.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import KimiLinearDims
from .tokenizer import MAX_CONTEXT, MAX_VOCAB, MIN_VOCAB, build_tokenizer, write_json, write_tokenizer

# --------------------------------------------------------------------------------------------
# Options and config
# --------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TinyOptions:
    """Dimensions of the tiny model. Defaults: 4 layers (0-2 KDA, 3 MLA), about 5.2M parameters.

    full_attn_layers: 1-based MLA layer numbers (the rest are KDA); None = every 4th layer, or
    all of them with all_mla. dense_layers: config first_k_dense_replace, i.e. 0-based layers
    0..dense_layers-1 use the dense MLP, the others the MoE.
    """

    hidden: int = 256
    layers: int = 4
    kda_heads: int = 4
    kda_head_dim: int = 64
    conv_kernel: int = 4
    mla_heads: int = 4
    # 512 latent + 64 rope = 576: the only MLA head size vLLM's CPU MLA kernel accepts
    kv_lora_rank: int = 512
    qk_nope: int = 64
    qk_rope: int = 64
    v_head: int = 64
    experts: int = 8
    topk: int = 2
    shared_experts: int = 1
    moe_inter: int = 128
    inter: int = 512
    vocab: int = 1024  # total tokenizer size, special tokens included
    all_mla: bool = False
    full_attn_layers: tuple[int, ...] | None = None
    dense_layers: int = 1
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type != "int" or f.name in ("seed", "dense_layers"):
                continue
            if v < 0 or (v == 0 and f.name != "shared_experts"):
                raise ValueError(f"{f.name} must be positive, got {v}")
        if self.topk > self.experts:
            raise ValueError(f"topk ({self.topk}) cannot exceed experts ({self.experts})")
        if not MIN_VOCAB <= self.vocab <= MAX_VOCAB:
            raise ValueError(f"vocab must be in [{MIN_VOCAB}, {MAX_VOCAB}] (what the embedded "
                             f"corpus can train), got {self.vocab}")
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError(f"dense_layers must be in 0..layers={self.layers}, got "
                             f"{self.dense_layers}")
        if self.full_attn_layers is not None:
            full = self.full_attn_layers
            if isinstance(full, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in full):
                raise ValueError("full_attn_layers must be a sequence of 1-based layer numbers, "
                                 f"got {full!r}")
            full = tuple(full)
            if self.all_mla:
                raise ValueError("all_mla and full_attn_layers both choose the MLA layers: give "
                                 "one of them (all_mla = every layer MLA)")
            bad = [i for i in full if not 1 <= i <= self.layers]
            if bad:
                raise ValueError(f"full_attn_layers {list(full)}: {bad} out of range; layer "
                                 f"numbers are 1-based, 1..layers={self.layers}")
            if len(set(full)) != len(full):
                raise ValueError(f"full_attn_layers {list(full)} lists a layer twice")
            object.__setattr__(self, "full_attn_layers", tuple(sorted(full)))


# Named presets: TinyOptions fields over the defaults (`build_tiny_checkpoint(d, **LAYOUTS[name])`,
# CLI `--layout NAME`). "mla-first": MLA at layer 0, several dense layers, odd head/expert counts
# (MLA keeps kv_lora_rank 512 + qk_rope 64, the only MLA head size vLLM's CPU kernel accepts).
LAYOUTS: dict[str, dict] = {
    "tiny": {},
    "mla-first": dict(layers=6, full_attn_layers=(1, 5), dense_layers=2, kda_heads=3, mla_heads=5,
                      experts=7, topk=3),
}


def layer_lists(layers: int, all_mla: bool = False,
                full_attn_layers=None) -> tuple[list[int], list[int]]:
    """(kda_layers, full_attn_layers), 1-BASED as in the published config: the given MLA layers,
    else every 4th (all with all_mla) is MLA."""
    if full_attn_layers is not None:
        full = sorted(full_attn_layers)
    else:
        full = [i for i in range(1, layers + 1) if all_mla or i % 4 == 0]
    kda = [i for i in range(1, layers + 1) if i not in full]
    return kda, full


def make_config(o: TinyOptions, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """config.json: the published Kimi-Linear-48B-A3B-Instruct fields at tiny dimensions."""
    kda, full = layer_lists(o.layers, o.all_mla, o.full_attn_layers)
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "hidden_size": o.hidden,
        "num_hidden_layers": o.layers,
        "vocab_size": vocab_size,
        "intermediate_size": o.inter,
        "num_attention_heads": o.mla_heads,
        "num_key_value_heads": o.mla_heads,
        # unused by the model, as in the published config (2304 / 32 = 72), but the config class
        # validates it as a rotary dim, which must be even: rounded down for odd head counts.
        "head_dim": max(2, o.hidden // o.mla_heads // 2 * 2),
        "q_lora_rank": None,
        "kv_lora_rank": o.kv_lora_rank,
        "qk_nope_head_dim": o.qk_nope,
        "qk_rope_head_dim": o.qk_rope,
        "v_head_dim": o.v_head,
        "mla_use_nope": True,
        "num_experts": o.experts,
        "num_experts_per_token": o.topk,
        "num_shared_experts": o.shared_experts,
        "moe_intermediate_size": o.moe_inter,
        "first_k_dense_replace": o.dense_layers,
        "moe_layer_freq": 1,
        "moe_router_activation_func": "sigmoid",
        "moe_renormalize": True,
        "routed_scaling_factor": 2.446,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_theta": 10000.0,  # present in the published config; NoPE MLA never uses it
        "rope_scaling": None,
        "use_cache": True,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "max_position_embeddings": MAX_CONTEXT,
        "model_max_length": MAX_CONTEXT,
        "torch_dtype": o.dtype,
        "linear_attn_config": {
            "num_heads": o.kda_heads,
            "head_dim": o.kda_head_dim,
            "short_conv_kernel_size": o.conv_kernel,
            "kda_layers": kda,
            "full_attn_layers": full,
        },
    }


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor and how to draw it.

    kind: "normal" (std), "norm" (1 + std * noise), "a_log" (log U(1, 16) per head),
    "dt_bias" (fla's init: softplus^-1 of a log-uniform dt in [1e-3, 1e-1]).
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "normal"
    std: float = 0.0
    fp32: bool = False  # stored float32 whatever the checkpoint dtype


# std = gain / sqrt(fan_in) keeps every projection's output O(1) for O(1) inputs at any width;
# fixed stds like 0.02 would shrink activations layer by layer in a model this narrow.
GAINS = {
    "f_b_proj.weight": 0.5,  # keeps softplus near dt
    "lm_head.weight": 4.0,  # logits with std ~4: clear argmax gaps, greedy robust to bf16 noise
}


def tensor_spec(name: str, shape: tuple[int, ...]) -> TensorSpec:
    """How the builder draws one checkpoint tensor, from its published name and shape."""
    if name == "model.embed_tokens.weight":
        return TensorSpec(name, shape, "normal", 1.0)
    if name.endswith(".A_log"):
        return TensorSpec(name, shape, "a_log", fp32=True)
    if name.endswith(".dt_bias"):
        return TensorSpec(name, shape, "dt_bias", fp32=True)
    if name.endswith(".e_score_correction_bias"):
        # comparable to the spread of sigmoid scores, so selection (score + bias) differs from
        # ranking by score alone and the bias path is exercised
        return TensorSpec(name, shape, "normal", 0.05, fp32=True)
    if name.endswith("_conv1d.weight"):
        return TensorSpec(name, shape, "normal", 1 / math.sqrt(shape[-1]))
    if len(shape) == 1:  # the RMSNorm weights
        return TensorSpec(name, shape, "norm", 0.05)
    gain = next((g for suffix, g in GAINS.items() if name.endswith(suffix)), 1.0)
    return TensorSpec(name, shape, "normal", gain / math.sqrt(shape[1]))


def tensor_specs(cfg: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint: names and shapes from the config module (the ones the
    plugin checks a checkpoint against), values drawn as `tensor_spec` says."""
    return [tensor_spec(n, shape) for n, shape in KimiLinearDims.from_config(cfg).checkpoint_shapes().items()]


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The float32 values of one tensor (deterministic in seed and spec.name)."""
    g = _generator(seed, spec.name)
    if spec.kind == "normal":
        return torch.randn(spec.shape, generator=g) * spec.std
    if spec.kind == "norm":
        return 1.0 + torch.randn(spec.shape, generator=g) * spec.std
    if spec.kind == "a_log":
        return torch.empty(spec.shape).uniform_(1.0, 16.0, generator=g).log()
    if spec.kind == "dt_bias":
        # fla's init, not "small around 0": with it the per-channel decay exp(g) has median
        # ~0.93 (5-95%: 0.4..0.996), so the recurrent state carries information across many
        # tokens and state-handling bugs in a server show up in the logits.
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand(spec.shape, generator=g) * (hi - lo) + lo)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    raise ValueError(f"unknown init kind {spec.kind!r} for {spec.name}")


def make_tensors(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {s.name: draw(s, seed).to(torch.float32 if s.fp32 else dtype).contiguous()
            for s in tensor_specs(cfg)}


# --------------------------------------------------------------------------------------------
# Directory
# --------------------------------------------------------------------------------------------


def build_tiny_checkpoint(out_dir, **options) -> Path:
    """Write the tiny model to out_dir (created if needed); options are TinyOptions fields."""
    from safetensors.torch import save_file

    unknown = set(options) - {f.name for f in dataclasses.fields(TinyOptions)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    o = TinyOptions(**options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(o.vocab)
    ids = write_tokenizer(tok, out)
    cfg = make_config(o, tok.get_vocab_size(), ids)
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json",
                {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                 "do_sample": False})
    weights = out / "model.safetensors"
    save_file(make_tensors(cfg, o.seed, DTYPES[o.dtype]), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # save_file creates 0600; servers often run as another user
    return out


def build_published_config(out_dir) -> Path:
    """Kimi-Linear-48B-A3B's config.json (the published dimensions) with the tiny tokenizer and
    no weights: for `vllm serve DIR --load-format dummy` (speed and memory at full size, no
    download). Token ids stay below the tokenizer's size, far below vocab_size."""
    from .planner import published_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(build_tokenizer(TinyOptions().vocab), out)
    cfg = published_config() | {
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
        "hidden_act": "silu", "torch_dtype": "bfloat16", "max_position_embeddings": 1048576,
        "model_max_length": 1048576, "moe_renormalize": True, "num_nextn_predict_layers": 0}
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json",
               {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]})
    return out


def _layer_numbers(text: str) -> tuple[int, ...]:
    """--full-attn-layers: a comma list of 1-based layer numbers ("" = no MLA layer)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of 1-based layer numbers such as 1,5, got {text!r}") from None


def _parse(argv: list[str] | None) -> tuple[Path, dict]:
    choices = list(LAYOUTS)
    pre = argparse.ArgumentParser(prog="python -m vllm_kimi_linear.tools.builder", add_help=False)
    pre.add_argument("--layout", choices=choices, default="tiny")
    layout = pre.parse_known_args(argv)[0].layout
    d = TinyOptions(**LAYOUTS[layout])  # the preset's values become the defaults
    p = argparse.ArgumentParser(prog="python -m vllm_kimi_linear.tools.builder",
                                description="Write a tiny random-weight Kimi Linear checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("outdir", type=Path, help="directory to write (created if missing)")
    p.add_argument("--layout", choices=choices, default="tiny",
                   help="named preset (LAYOUTS) whose values replace the defaults below; options "
                        "given explicitly still override it")
    helps = {
        "hidden": "hidden_size",
        "layers": "num_hidden_layers (1-based multiples of 4 are MLA unless --full-attn-layers)",
        "kda_heads": "KDA heads H", "kda_head_dim": "KDA head_dim D",
        "conv_kernel": "KDA short_conv_kernel_size", "mla_heads": "MLA heads",
        "kv_lora_rank": "MLA kv_lora_rank", "qk_nope": "qk_nope_head_dim",
        "qk_rope": "qk_rope_head_dim (no rotary is applied)", "v_head": "v_head_dim",
        "experts": "routed experts", "topk": "num_experts_per_token",
        "shared_experts": "num_shared_experts", "moe_inter": "moe_intermediate_size",
        "inter": "intermediate_size (dense MLP of the first --dense-layers layers)",
        "dense_layers": "first_k_dense_replace, 0..layers: layers 0..N-1 (0-based) use the "
                        "dense MLP",
        "vocab": f"tokenizer size incl. special tokens, {MIN_VOCAB}..{MAX_VOCAB}",
        "seed": "weight seed",
    }
    for name, text in helps.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name),
                       help=text)
    p.add_argument("--all-mla", action="store_true", default=d.all_mla,
                   help="every layer MLA (no KDA layers)")
    p.add_argument("--full-attn-layers", type=_layer_numbers, default=d.full_attn_layers,
                   metavar="1,5", help="1-based MLA layers, comma-separated; the rest are KDA. "
                                       "None: every 4th (all with --all-mla)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype,
                   help="weight dtype (A_log, dt_bias, e_score_correction_bias stay float32)")
    p.add_argument("--published-layout", action="store_true",
                   help="write the files as the published checkpoint has them: weight shards + "
                        "index, tiktoken.model (--vocab counts its 256 reserved tokens), Kimi chat "
                        "template, auto_map (tools/published.py)")
    p.add_argument("--shards", type=int, default=4, help="weight files with --published-layout")
    a = vars(p.parse_args(argv))
    for key in ("layout", "published_layout", "shards"):  # not TinyOptions: main reads the last two
        a.pop(key)
    return a.pop("outdir"), a


def _file_layout(argv: list[str]) -> tuple[bool, int]:
    """(--published-layout, --shards) from the command line."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--published-layout", action="store_true")
    p.add_argument("--shards", type=int, default=4)
    a = p.parse_known_args(argv)[0]
    return a.published_layout, a.shards


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--published-config" in argv:  # the published dimensions, no weights (--load-format dummy)
        rest = [a for a in argv if a != "--published-config"]
        if len(rest) != 1:
            print("usage: --published-config OUTDIR (no other option)", file=sys.stderr)
            return 2
        print(f"wrote {build_published_config(Path(rest[0]))}: the published config, tiny tokenizer, "
              "no weights (serve with --load-format dummy)")
        return 0
    out, options = _parse(argv)
    published, shards = _file_layout(argv)
    try:
        if published:
            from .published import build_published_checkpoint, describe
            print(describe(build_published_checkpoint(out, shards=shards, **options)))
            return 0
        path = build_tiny_checkpoint(out, **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((path / "config.json").read_text())
    n = sum(math.prod(s.shape) for s in tensor_specs(cfg))
    lin = cfg["linear_attn_config"]
    print(f"wrote {path}: {cfg['num_hidden_layers']} layers (KDA {lin['kda_layers']}, "
          f"MLA {lin['full_attn_layers']}, 1-based; {cfg['first_k_dense_replace']} dense), "
          f"vocab {cfg['vocab_size']}, {n / 1e6:.2f}M parameters, {cfg['torch_dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
