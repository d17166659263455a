"""Validation of a Kimi Linear config and checkpoint, run when the server starts.

This module owns the rules a config.json must follow for our plugin to serve it (published field
set, 1-based layer lists, what the CPU MLA kernel and tensor parallelism need), and the expected
checkpoint tensor names/shapes. Every problem becomes ONE ValueError that names the field or
tensor and says what to change, instead of a crash deep inside a kernel. No vLLM import here:
`validate_config` and `expected_checkpoint_shapes` take plain dicts, so they are testable alone.
"""
from __future__ import annotations

import json
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


class KimiLinearCheckpointError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape; the message names the tensor."""


def _fail(msg: str):
    raise KimiLinearConfigError(PREFIX + msg)


def _pos_int(cfg: dict, key: str, where: str = ""):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(f"{where}{key} must be a positive integer, got {v!r}")


def validate_config(cfg: dict[str, Any], tp_size: int = 1, on_cpu: bool = False) -> None:
    """Raise KimiLinearConfigError for the first problem found; return None if servable."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        _fail(f"missing field(s) {missing}: add them (see the published Kimi-Linear-48B-A3B config)")
    lin = cfg["linear_attn_config"]
    if not isinstance(lin, dict):
        _fail(f"linear_attn_config must be an object with {list(REQUIRED_LINEAR)}, got {lin!r}")
    missing = [k for k in REQUIRED_LINEAR if k not in lin]
    if missing:
        _fail(f"linear_attn_config is missing field(s) {missing}")
    for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
              "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "num_experts", "num_experts_per_token", "moe_intermediate_size"):
        _pos_int(cfg, k)
    for k in ("num_heads", "head_dim", "short_conv_kernel_size"):
        _pos_int(lin, k, "linear_attn_config.")
    if lin["short_conv_kernel_size"] < 2:
        _fail("linear_attn_config.short_conv_kernel_size must be >= 2 (the conv state keeps K-1 "
              f"inputs), got {lin['short_conv_kernel_size']}")

    # Layer lists: 1-based, and together they must name every layer exactly once.
    L = cfg["num_hidden_layers"]
    kda, full = lin["kda_layers"], lin["full_attn_layers"]
    for name, lst in (("kda_layers", kda), ("full_attn_layers", full)):
        if not isinstance(lst, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in lst):
            _fail(f"linear_attn_config.{name} must be a list of 1-based layer numbers, got {lst!r}")
        bad = [i for i in lst if not 1 <= i <= L]
        if bad:
            _fail(f"linear_attn_config.{name} has {bad} out of range: layer numbers are 1-based, "
                  f"1..num_hidden_layers={L}")
        if len(set(lst)) != len(lst):
            _fail(f"linear_attn_config.{name} lists a layer twice: {lst}")
    both = sorted(set(kda) & set(full))
    if both:
        _fail(f"layer(s) {both} (1-based) are in both linear_attn_config.kda_layers and "
              "full_attn_layers: put each layer in exactly one list")
    neither = sorted(set(range(1, L + 1)) - set(kda) - set(full))
    if neither:
        _fail(f"layer(s) {neither} (1-based) are in neither linear_attn_config.kda_layers nor "
              "full_attn_layers: put each layer in exactly one list")

    # MLA: Kimi Linear's full-attention layers use no rotary embedding.
    if cfg["mla_use_nope"] is not True:
        _fail(f"mla_use_nope must be true (Kimi Linear's MLA applies no rotary embedding), "
              f"got {cfg['mla_use_nope']!r}")
    if cfg.get("q_lora_rank") is not None:
        _fail(f"q_lora_rank must be null (Kimi Linear projects q directly), got {cfg['q_lora_rank']!r}")
    if cfg.get("mla_use_output_gate"):
        _fail("mla_use_output_gate must be false (not part of Kimi Linear)")
    if on_cpu and full and (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) != (CPU_MLA_LATENT, CPU_MLA_ROPE):
        _fail(f"kv_lora_rank={cfg['kv_lora_rank']} and qk_rope_head_dim={cfg['qk_rope_head_dim']}: "
              f"vLLM's CPU MLA kernel supports only kv_lora_rank={CPU_MLA_LATENT} with "
              f"qk_rope_head_dim={CPU_MLA_ROPE} (cache head 576); set those values")

    # MoE (CPU router: sigmoid needs grouped top-k; see vLLM CPURouter)
    if cfg["num_experts_per_token"] > cfg["num_experts"]:
        _fail(f"num_experts_per_token={cfg['num_experts_per_token']} exceeds num_experts="
              f"{cfg['num_experts']}")
    act = cfg.get("moe_router_activation_func", "sigmoid")
    if act not in ("sigmoid", "softmax"):
        _fail(f"moe_router_activation_func must be 'sigmoid' or 'softmax', got {act!r}")
    groups = cfg.get("num_expert_group", 1) or 1
    if cfg["num_experts"] % groups or cfg["num_experts"] // groups < 2:
        _fail(f"num_expert_group={groups} must divide num_experts={cfg['num_experts']} into "
              "groups of at least 2 experts")
    if cfg.get("hidden_act", "silu") != "silu":
        _fail(f"hidden_act must be 'silu', got {cfg.get('hidden_act')!r}")
    if cfg.get("num_nextn_predict_layers", 0):
        _fail("num_nextn_predict_layers must be 0: multi-token prediction layers are not supported")

    # Tensor parallelism shards KDA and MLA by head and MLPs by intermediate dim.
    if tp_size > 1:
        for field, v in (("linear_attn_config.num_heads", lin["num_heads"]),
                         ("num_attention_heads", cfg["num_attention_heads"]),
                         ("moe_intermediate_size", cfg["moe_intermediate_size"]),
                         ("intermediate_size", cfg["intermediate_size"])):
            if v % tp_size:
                _fail(f"{field}={v} is not divisible by the tensor-parallel size {tp_size}: "
                      "choose a --tensor-parallel-size that divides it")


def is_kda(cfg: dict, i: int) -> bool:
    """0-based layer i is KDA when i+1 is in the 1-based kda_layers."""
    return i + 1 in cfg["linear_attn_config"]["kda_layers"]


def is_moe(cfg: dict, i: int) -> bool:
    return i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0


def expected_checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape implied by the config (kimi-linear.md, "Checkpoint tensors")."""
    hid, lin = cfg["hidden_size"], cfg["linear_attn_config"]
    H, D, K = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    n, nope, rope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    vh, r, E, mi = cfg["v_head_dim"], cfg["kv_lora_rank"], cfg["num_experts"], cfg["moe_intermediate_size"]
    ms = mi * cfg.get("num_shared_experts", 0)
    s = {"model.embed_tokens.weight": (cfg["vocab_size"], hid), "model.norm.weight": (hid,)}
    if not cfg.get("tie_word_embeddings", False):
        s["lm_head.weight"] = (cfg["vocab_size"], hid)
    for i in range(cfg["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        if is_kda(cfg, i):
            for x in "qkv":
                s[a + f"{x}_proj.weight"] = (H * D, hid)
                s[a + f"{x}_conv1d.weight"] = (H * D, 1, K)
            s |= {a + "A_log": (1, 1, H, 1), a + "dt_bias": (H * D,), a + "f_a_proj.weight": (D, hid),
                  a + "f_b_proj.weight": (H * D, D), a + "b_proj.weight": (H, hid),
                  a + "g_a_proj.weight": (D, hid), a + "g_b_proj.weight": (H * D, D),
                  a + "o_norm.weight": (D,), a + "o_proj.weight": (hid, H * D)}
        else:
            s |= {a + "q_proj.weight": (n * (nope + rope), hid),
                  a + "kv_a_proj_with_mqa.weight": (r + rope, hid),
                  a + "kv_a_layernorm.weight": (r,), a + "kv_b_proj.weight": (n * (nope + vh), r),
                  a + "o_proj.weight": (hid, n * vh)}
        s[p + "input_layernorm.weight"] = (hid,)
        s[p + "post_attention_layernorm.weight"] = (hid,)
        if is_moe(cfg, i):
            m = p + "block_sparse_moe."
            s |= {m + "gate.weight": (E, hid), m + "gate.e_score_correction_bias": (E,)}
            for j in range(E):
                s |= {m + f"experts.{j}.w1.weight": (mi, hid), m + f"experts.{j}.w3.weight": (mi, hid),
                      m + f"experts.{j}.w2.weight": (hid, mi)}
            if ms:
                s |= {m + "shared_experts.gate_proj.weight": (ms, hid),
                      m + "shared_experts.up_proj.weight": (ms, hid),
                      m + "shared_experts.down_proj.weight": (hid, ms)}
        else:
            it = cfg["intermediate_size"]
            s |= {p + "mlp.gate_proj.weight": (it, hid), p + "mlp.up_proj.weight": (it, hid),
                  p + "mlp.down_proj.weight": (hid, it)}
    return s


def check_tensor(expected: dict[str, tuple[int, ...]], name: str, shape) -> bool:
    """True if `name` is a tensor we load; raise if its shape is wrong. Unknown names -> False."""
    want = expected.get(name)
    if want is None:
        return False
    if tuple(shape) != want:
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {name} has shape {tuple(shape)}, but config.json "
            f"implies {want}: the checkpoint does not match its config")
    return True


def check_all_present(expected: dict[str, tuple[int, ...]], seen: set[str]) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {missing[0]} is missing{more}; expected shape "
            f"{expected[missing[0]]} from config.json. Missing: {missing[:8]}")


FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors names; the plugin serves unquantized weights


def safetensors_headers(model_dir: Path) -> dict[str, dict]:
    """{tensor name: {"dtype": "BF16", "shape": [...], ...}} of every *.safetensors file in a
    directory, from the file headers alone (an 8-byte length, then JSON): no tensor data is read,
    so this is cheap at 48B."""
    headers = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        headers |= {k: v for k, v in header.items() if k != "__metadata__"}
    return headers


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in safetensors_headers(model_dir).items()}


def check_dtype(name: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: tensor {name} has dtype {dtype}, but this plugin loads "
            f"unquantized floating-point weights ({', '.join(FLOAT_DTYPES)}): convert the "
            "checkpoint, or use one saved in bfloat16")


def check_checkpoint(cfg: dict, model_dir: str | Path) -> None:
    """Every tensor the config implies is in the local checkpoint with the implied shape and a
    floating-point dtype; else one KimiLinearCheckpointError naming the tensor. Directories
    without safetensors (a hub id, other formats) are left to the loader, which applies the same
    shape checks while loading."""
    found = safetensors_headers(model_dir) if Path(model_dir).is_dir() else {}
    if not found:
        return
    expected = expected_checkpoint_shapes(cfg)
    for name, h in found.items():
        if check_tensor(expected, name, h["shape"]):
            check_dtype(name, h["dtype"])
    check_all_present(expected, set(found))


def raw_config(hf_config, model_path: str | None = None) -> dict:
    """The config as published: config.json when the model is a local directory (so a missing
    field is seen as missing, not as a default filled in by the config class)."""
    if model_path:
        f = Path(model_path) / "config.json"
        if f.is_file():
            return json.loads(f.read_text())
    return hf_config.to_dict()
