"""What a Kimi Linear config.json must say, as one typed, validated object: `KimiLinearDims`.

This module owns the rules a config must follow for the plugin to serve it (published field set,
1-based layer lists, the features Kimi Linear does not use) and the dimensions everything else
reads: the model and its layers, the capacity planner, the checkpoint builder and the checkpoint
check (`checkpoint_shapes()`). Every problem is ONE KimiLinearConfigError naming the config.json
field and what to change, raised while the object is built, so no layer sees a config that was
not checked. No vLLM import: it takes the plain config dict, so it is testable alone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "Kimi Linear config.json: "

REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "mla_use_nope", "num_experts", "num_experts_per_token",
            "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
            "routed_scaling_factor", "rms_norm_eps", "linear_attn_config")
REQUIRED_LINEAR = ("num_heads", "head_dim", "short_conv_kernel_size", "kda_layers",
                   "full_attn_layers")
# vLLM's CPU MLA decode kernel (csrc mla_decode_kvcache) is compiled for one head size only.
CPU_MLA_LATENT, CPU_MLA_ROPE = 512, 64


class KimiLinearConfigError(ValueError):
    """A config.json field our plugin cannot serve; the message names the field."""


def _fail(msg: str):
    raise KimiLinearConfigError(PREFIX + msg)


def _pos_ints(where: str, **values) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            _fail(f"{where}{key} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class KDADims:
    """A KDA layer (linear_attn_config): heads of head_dim (keys and values alike), short conv."""
    num_heads: int
    head_dim: int
    short_conv_kernel_size: int

    def __post_init__(self):
        _pos_ints("linear_attn_config.", **dataclasses.asdict(self))
        if self.short_conv_kernel_size < 2:
            _fail("linear_attn_config.short_conv_kernel_size must be >= 2 (the conv state keeps K-1 "
                  f"inputs), got {self.short_conv_kernel_size}")

    @property
    def proj_dim(self) -> int:  # q, k, v, f, g each project to num_heads x head_dim
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class MLADims:
    """An MLA layer: num_attention_heads over one shared latent of kv_lora_rank + qk_rope_head_dim."""
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        _pos_ints("", num_attention_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
                  qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                  v_head_dim=self.v_head_dim)

    @property
    def latent_dim(self) -> int:  # what the paged MLA cache holds per token and layer
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEDims:
    """The MoE feed-forward: sigmoid (or softmax) router with bias correction, shared experts."""
    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    router_activation: str = "sigmoid"
    renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1

    def __post_init__(self):
        _pos_ints("", num_experts=self.num_experts, num_experts_per_token=self.top_k,
                  moe_intermediate_size=self.intermediate_size)
        if self.top_k > self.num_experts:
            _fail(f"num_experts_per_token={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router_activation not in ("sigmoid", "softmax"):
            _fail(f"moe_router_activation_func must be 'sigmoid' or 'softmax', got {self.router_activation!r}")
        # the CPU router's sigmoid path is grouped top-k (vLLM CPURouter)
        if self.num_experts % self.num_expert_group or self.num_experts // self.num_expert_group < 2:
            _fail(f"num_expert_group={self.num_expert_group} must divide num_experts={self.num_experts} "
                  "into groups of at least 2 experts")

    @property
    def shared_intermediate_size(self) -> int:
        return self.intermediate_size * self.num_shared_experts


@dataclass(frozen=True)
class KimiLinearDims:
    """Every dimension of a Kimi Linear model. Layer lists are 1-based, as in config.json;
    `is_kda(i)` / `is_moe(i)` take the 0-based layer index the model uses."""
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int  # the dense MLP of the first first_k_dense_replace layers
    rms_norm_eps: float
    kda: KDADims
    mla: MLADims
    moe: MoEDims
    kda_layers: tuple[int, ...]
    full_attn_layers: tuple[int, ...]
    first_k_dense_replace: int
    moe_layer_freq: int
    tie_word_embeddings: bool = False
    mtp_layers: int = 0  # num_nextn_predict_layers: in the checkpoint after the decoder, not served

    def __post_init__(self):
        _pos_ints("", hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                  vocab_size=self.vocab_size, intermediate_size=self.intermediate_size,
                  moe_layer_freq=self.moe_layer_freq)
        k = self.first_k_dense_replace
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            _fail(f"first_k_dense_replace must be an integer >= 0 (the number of leading dense "
                  f"layers), got {k!r}")
        L = self.num_layers
        for name, lst in (("kda_layers", self.kda_layers), ("full_attn_layers", self.full_attn_layers)):
            bad = [i for i in lst if not 1 <= i <= L]
            if bad:
                _fail(f"linear_attn_config.{name} has {bad} out of range: layer numbers are 1-based, "
                      f"1..num_hidden_layers={L}")
            if len(set(lst)) != len(lst):
                _fail(f"linear_attn_config.{name} lists a layer twice: {list(lst)}")
        both = sorted(set(self.kda_layers) & set(self.full_attn_layers))
        if both:
            _fail(f"layer(s) {both} (1-based) are in both linear_attn_config.kda_layers and "
                  "full_attn_layers: put each layer in exactly one list")
        neither = sorted(set(range(1, L + 1)) - set(self.kda_layers) - set(self.full_attn_layers))
        if neither:
            _fail(f"layer(s) {neither} (1-based) are in neither linear_attn_config.kda_layers nor "
                  "full_attn_layers: put each layer in exactly one list")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> KimiLinearDims:
        """Build from a config.json dict; KimiLinearConfigError for the first problem found."""
        missing = [k for k in REQUIRED if k not in cfg]
        if missing:
            _fail(f"missing field(s) {missing}: add them (see the published Kimi-Linear-48B-A3B config)")
        lin = cfg["linear_attn_config"]
        if not isinstance(lin, dict):
            _fail(f"linear_attn_config must be an object with {list(REQUIRED_LINEAR)}, got {lin!r}")
        missing = [k for k in REQUIRED_LINEAR if k not in lin]
        if missing:
            _fail(f"linear_attn_config is missing field(s) {missing}")
        for name in ("kda_layers", "full_attn_layers"):
            lst = lin[name]
            if not isinstance(lst, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                    for i in lst):
                _fail(f"linear_attn_config.{name} must be a list of 1-based layer numbers, got {lst!r}")
        _check_unsupported(cfg)
        return cls(
            hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"], intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg["rms_norm_eps"],
            mla=MLADims(cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"],
                        cfg["qk_rope_head_dim"], cfg["v_head_dim"]),
            kda=KDADims(lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]),
            moe=MoEDims(num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_token"],
                        intermediate_size=cfg["moe_intermediate_size"],
                        num_shared_experts=cfg.get("num_shared_experts") or 0,
                        routed_scaling_factor=cfg["routed_scaling_factor"],
                        router_activation=cfg.get("moe_router_activation_func", "sigmoid"),
                        renormalize=cfg.get("moe_renormalize", True),
                        num_expert_group=cfg.get("num_expert_group") or 1,
                        topk_group=cfg.get("topk_group") or 1),
            kda_layers=tuple(lin["kda_layers"]), full_attn_layers=tuple(lin["full_attn_layers"]),
            first_k_dense_replace=cfg["first_k_dense_replace"], moe_layer_freq=cfg["moe_layer_freq"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mtp_layers=cfg.get("num_nextn_predict_layers", 0) or 0)

    # ---- layer kinds (0-based index i, as the model numbers its layers)
    def is_kda(self, i: int) -> bool:
        return i + 1 in self.kda_layers

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def check_servable(self, tp_size: int = 1, on_cpu: bool = False) -> KimiLinearDims:
        """What the deployment adds: TP shards KDA and MLA by head and MLPs by intermediate dim;
        vLLM's CPU MLA kernel takes one latent size."""
        if on_cpu and self.full_attn_layers and (self.mla.kv_lora_rank, self.mla.qk_rope_head_dim) != (
                CPU_MLA_LATENT, CPU_MLA_ROPE):
            _fail(f"kv_lora_rank={self.mla.kv_lora_rank} and qk_rope_head_dim={self.mla.qk_rope_head_dim}: "
                  f"vLLM's CPU MLA kernel supports only kv_lora_rank={CPU_MLA_LATENT} with "
                  f"qk_rope_head_dim={CPU_MLA_ROPE} (cache head 576); set those values")
        if tp_size > 1:
            for field, v in (("linear_attn_config.num_heads", self.kda.num_heads),
                             ("num_attention_heads", self.mla.num_heads),
                             ("moe_intermediate_size", self.moe.intermediate_size),
                             ("intermediate_size", self.intermediate_size)):
                if v % tp_size:
                    _fail(f"{field}={v} is not divisible by the tensor-parallel size {tp_size}: "
                          "choose a --tensor-parallel-size that divides it")
        return self

    def all_mla(self) -> KimiLinearDims:
        """The same model with every layer MLA (the baseline the KV reduction is measured against)."""
        return dataclasses.replace(self, kda_layers=(), full_attn_layers=tuple(range(1, self.num_layers + 1)))

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> shape (kimi-linear.md, "Checkpoint tensors")."""
        hid, kda, mla, moe = self.hidden_size, self.kda, self.mla, self.moe
        HD, D, K = kda.proj_dim, kda.head_dim, kda.short_conv_kernel_size
        n, r, rope = mla.num_heads, mla.kv_lora_rank, mla.qk_rope_head_dim
        s = {"model.embed_tokens.weight": (self.vocab_size, hid), "model.norm.weight": (hid,)}
        if not self.tie_word_embeddings:
            s["lm_head.weight"] = (self.vocab_size, hid)
        for i in range(self.num_layers):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            if self.is_kda(i):
                for x in "qkv":
                    s[a + f"{x}_proj.weight"] = (HD, hid)
                    s[a + f"{x}_conv1d.weight"] = (HD, 1, K)
                s |= {a + "A_log": (1, 1, kda.num_heads, 1), a + "dt_bias": (HD,),
                      a + "f_a_proj.weight": (D, hid), a + "f_b_proj.weight": (HD, D),
                      a + "b_proj.weight": (kda.num_heads, hid), a + "g_a_proj.weight": (D, hid),
                      a + "g_b_proj.weight": (HD, D), a + "o_norm.weight": (D,),
                      a + "o_proj.weight": (hid, HD)}
            else:
                s |= {a + "q_proj.weight": (n * mla.qk_head_dim, hid),
                      a + "kv_a_proj_with_mqa.weight": (r + rope, hid), a + "kv_a_layernorm.weight": (r,),
                      a + "kv_b_proj.weight": (n * (mla.qk_nope_head_dim + mla.v_head_dim), r),
                      a + "o_proj.weight": (hid, n * mla.v_head_dim)}
            s[p + "input_layernorm.weight"] = (hid,)
            s[p + "post_attention_layernorm.weight"] = (hid,)
            if self.is_moe(i):
                m, mi, ms = p + "block_sparse_moe.", moe.intermediate_size, moe.shared_intermediate_size
                s |= {m + "gate.weight": (moe.num_experts, hid), m + "gate.e_score_correction_bias": (moe.num_experts,)}
                for j in range(moe.num_experts):
                    s |= {m + f"experts.{j}.w1.weight": (mi, hid), m + f"experts.{j}.w3.weight": (mi, hid),
                          m + f"experts.{j}.w2.weight": (hid, mi)}
                if ms:
                    s |= {m + "shared_experts.gate_proj.weight": (ms, hid),
                          m + "shared_experts.up_proj.weight": (ms, hid),
                          m + "shared_experts.down_proj.weight": (hid, ms)}
            else:
                it = self.intermediate_size
                s |= {p + "mlp.gate_proj.weight": (it, hid), p + "mlp.up_proj.weight": (it, hid),
                      p + "mlp.down_proj.weight": (hid, it)}
        return s


def _check_unsupported(cfg: dict) -> None:
    """Fields that select something Kimi Linear does not have (or we do not serve)."""
    if cfg["mla_use_nope"] is not True:
        _fail(f"mla_use_nope must be true (Kimi Linear's MLA applies no rotary embedding), "
              f"got {cfg['mla_use_nope']!r}")
    if cfg.get("q_lora_rank") is not None:
        _fail(f"q_lora_rank must be null (Kimi Linear projects q directly), got {cfg['q_lora_rank']!r}")
    if cfg.get("mla_use_output_gate"):
        _fail("mla_use_output_gate must be false (not part of Kimi Linear)")
    if cfg.get("hidden_act", "silu") != "silu":
        _fail(f"hidden_act must be 'silu', got {cfg.get('hidden_act')!r}")
    mtp = cfg.get("num_nextn_predict_layers", 0) or 0
    if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
        _fail(f"num_nextn_predict_layers must be an integer >= 0, got {mtp!r}")


def validate_config(cfg: dict[str, Any], tp_size: int = 1, on_cpu: bool = False) -> KimiLinearDims:
    """The dimensions of a servable config; KimiLinearConfigError for the first problem found."""
    return KimiLinearDims.from_config(cfg).check_servable(tp_size, on_cpu)


def raw_config(hf_config, model_path: str | None = None) -> dict:
    """The config as published: config.json when the model is a local directory (so a missing
    field is seen as missing, not as a default filled in by the config class)."""
    if model_path:
        f = Path(model_path) / "config.json"
        if f.is_file():
            return json.loads(f.read_text())
    return hf_config.to_dict()


def model_dims(vllm_config) -> KimiLinearDims:
    """The dimensions of the model a VllmConfig serves (checked for servability by the config
    hook at start-up, before any layer is built)."""
    mc = vllm_config.model_config
    return KimiLinearDims.from_config(raw_config(mc.hf_config, mc.model))
