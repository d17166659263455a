"""An independent, plain-PyTorch, full-sequence forward of Kimi Linear, for checking the plugin.

Written straight from the equations in /work/shared/reference/kimi-linear.md; it imports neither
vLLM nor anything of vllm_kimi_linear, and shares no code with the plugin's model. Only the KDA
core comes from elsewhere: fla-core's naive (loop-per-token) gate and recurrence.

    model = load(model_dir)                   # config.json + model.safetensors
    logits = forward(model, ids)              # [T, vocab], no cache: the whole sequence each call
    greedy_generate(model, prompt, 16)        # new token ids
    prompt_logprobs(model, ids)               # log p(ids[t] | ids[:t]) for t >= 1

Compute dtype is float32 or float64 (`load(..., dtype=torch.float64)`); a bfloat16 checkpoint is
upcast exactly. In float64 the recurrence runs in true float64 (fla's naive code casts to
`torch.float`, which we rebind); fla's gate always evaluates softplus in float32.
"""
from __future__ import annotations

import json
import math
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass
class RefModel:
    config: dict
    w: dict[str, torch.Tensor]
    dtype: torch.dtype
    kda: set[int] = field(default_factory=set)  # 0-based KDA layer indices
    mla: set[int] = field(default_factory=set)  # 0-based MLA layer indices

    @property
    def eps(self) -> float:
        return self.config["rms_norm_eps"]

    def is_moe(self, i: int) -> bool:
        c = self.config
        return i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, from the config alone, as kimi-linear.md "Checkpoint
    tensors" lists them (written apart from the plugin's config module, to check it)."""
    hid, lin = c["hidden_size"], c["linear_attn_config"]
    H, D, K = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    HD = H * D
    n = c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    mi = c["moe_intermediate_size"]
    ms = mi * c.get("num_shared_experts", 0)
    out = {"model.embed_tokens.weight": (c["vocab_size"], hid), "model.norm.weight": (hid,),
           "lm_head.weight": (c["vocab_size"], hid)}
    for i in range(c["num_hidden_layers"]):
        L = f"model.layers.{i}."
        A = L + "self_attn."
        if i + 1 in lin["kda_layers"]:
            shapes = {"q_proj.weight": (HD, hid), "k_proj.weight": (HD, hid), "v_proj.weight": (HD, hid),
                      "q_conv1d.weight": (HD, 1, K), "k_conv1d.weight": (HD, 1, K),
                      "v_conv1d.weight": (HD, 1, K), "A_log": (1, 1, H, 1), "dt_bias": (HD,),
                      "f_a_proj.weight": (D, hid), "f_b_proj.weight": (HD, D), "b_proj.weight": (H, hid),
                      "g_a_proj.weight": (D, hid), "g_b_proj.weight": (HD, D), "o_norm.weight": (D,),
                      "o_proj.weight": (hid, HD)}
        else:
            assert i + 1 in lin["full_attn_layers"]
            shapes = {"q_proj.weight": (n * qk, hid),
                      "kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], hid),
                      "kv_a_layernorm.weight": (c["kv_lora_rank"],),
                      "kv_b_proj.weight": (n * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
                      "o_proj.weight": (hid, n * c["v_head_dim"])}
        out |= {A + k: v for k, v in shapes.items()}
        out |= {L + "input_layernorm.weight": (hid,), L + "post_attention_layernorm.weight": (hid,)}
        if i < c["first_k_dense_replace"] or i % c["moe_layer_freq"]:  # dense MLP
            it = c["intermediate_size"]
            out |= {L + "mlp.gate_proj.weight": (it, hid), L + "mlp.up_proj.weight": (it, hid),
                    L + "mlp.down_proj.weight": (hid, it)}
        else:
            M = L + "block_sparse_moe."
            out |= {M + "gate.weight": (c["num_experts"], hid),
                    M + "gate.e_score_correction_bias": (c["num_experts"],)}
            if ms:
                out |= {M + "shared_experts.gate_proj.weight": (ms, hid),
                        M + "shared_experts.up_proj.weight": (ms, hid),
                        M + "shared_experts.down_proj.weight": (hid, ms)}
            for j in range(c["num_experts"]):
                out |= {M + f"experts.{j}.w1.weight": (mi, hid), M + f"experts.{j}.w3.weight": (mi, hid),
                        M + f"experts.{j}.w2.weight": (hid, mi)}
    return out


def load(model_dir, dtype: torch.dtype = torch.float32) -> RefModel:
    """Read config.json and model.safetensors; check every tensor's name and shape."""
    from safetensors.torch import load_file

    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be float32 or float64, got {dtype}")
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("q_lora_rank") is not None:
        raise ValueError("this reference implements q_lora_rank = null only (as published)")
    if not cfg.get("mla_use_nope", False):
        raise ValueError("this reference implements NoPE MLA only (mla_use_nope = true)")
    lin = cfg["linear_attn_config"]
    L = cfg["num_hidden_layers"]
    kda = {i for i in range(L) if i + 1 in lin["kda_layers"]}
    mla = {i for i in range(L) if i + 1 in lin["full_attn_layers"]}
    if kda & mla or kda | mla != set(range(L)):
        raise ValueError(f"1-based kda_layers {lin['kda_layers']} and full_attn_layers "
                         f"{lin['full_attn_layers']} must partition 1..{L}")

    raw = load_file(str(d / "model.safetensors"))
    want = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(raw)), sorted(set(raw) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint tensors differ from the config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, shape in want.items():
        if tuple(raw[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(raw[name].shape)}, config implies {shape}")
    w = {k: v.to(dtype) for k, v in raw.items()}
    return RefModel(cfg, w, dtype, kda, mla)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _hi(x: torch.Tensor) -> torch.Tensor:
    """At least float32: where the spec says "in fp32", float64 compute stays float64."""
    return x if x.dtype == torch.float64 else x.float()


_ROUND_TO: torch.dtype | None = None  # set only inside rounded_activations()
_FP8_INPUTS: set[int] = set()  # ids of the weights whose inputs fp8_activations() quantizes


def _round(x: torch.Tensor) -> torch.Tensor:
    return x if _ROUND_TO is None else x.to(_ROUND_TO).to(x.dtype)


def _fp8_groups(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x quantized to float8_e4m3fn and back, per row in `group`-wide column groups, each scaled
    by a float32 factor so its largest |value| is 448 (at least 1 / (448 * 512)), the arithmetic
    in float32 as the quantizer's."""
    fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(fp8).max
    rows, cols = x.shape[:-1], x.shape[-1]
    if cols % group:
        raise ValueError(f"FP8 input groups of {group} need a multiple of {group} columns, got {cols}")
    g = x.float().reshape(*rows, cols // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / fp8_max).clamp(min=1 / (fp8_max * 512))
    q = (g / scale).clamp(-fp8_max, fp8_max).to(fp8)
    return (q.to(x.dtype) * scale.to(x.dtype)).reshape(x.shape)


@contextmanager
def rounded_activations(dtype: torch.dtype = torch.bfloat16):
    """Inside the block, every linear layer's input and output and every RMSNorm's output are
    rounded to `dtype` (the arithmetic stays in the model's compute dtype; router logits stay
    unrounded, as vLLM computes them in fp32). That is the least rounding a server running in
    `dtype` does, so the difference it makes to the float64 result is the precision floor a
    served bf16 model is measured against (tests/gpu)."""
    global _ROUND_TO
    saved, _ROUND_TO = _ROUND_TO, dtype
    try:
        yield
    finally:
        _ROUND_TO = saved


@contextmanager
def fp8_activations(weights):
    """Inside the block, a linear layer whose weight is one of `weights` (tensors of the loaded
    model, e.g. those an FP8 checkpoint stores with a `weight_scale_inv`) quantizes its input as
    vLLM's block-FP8 GEMMs do: per token, in 128-wide groups, to float8_e4m3 with a dynamic
    scale (amax / 448), after the bf16 rounding of rounded_activations(). With that block, the
    difference to the float64 result is the precision floor a served block-FP8 model is measured
    against (weights as the checkpoint stores them; the weights' own quantization is in both)."""
    global _FP8_INPUTS
    saved, _FP8_INPUTS = _FP8_INPUTS, {id(w) for w in weights}
    try:
        yield
    finally:
        _FP8_INPUTS = saved


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in (at least) fp32; no "+1" on the weight."""
    h = _hi(x)
    return _round((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * _hi(weight)).to(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, round_output: bool = True) -> torch.Tensor:
    x = _round(x)
    if id(weight) in _FP8_INPUTS:
        x = _fp8_groups(x)
    y = x @ weight.T  # no Linear of the model has a bias
    return _round(y) if round_output else y


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, C], weight [C, 1, K] (nn.Conv1d layout): y[t, c] = sum_k weight[c, 0, k] * x[t-K+1+k, c],
    with x = 0 before the first token."""
    K = weight.shape[-1]
    y = F.conv1d(F.pad(x.T, (K - 1, 0)).unsqueeze(0), weight, groups=x.shape[1])
    return y[0].T


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


class _Torch64(types.ModuleType):
    """A `torch` whose `torch.float` is float64 (fla's naive code casts with `.to(torch.float)`)."""
    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _kda_ops(dtype: torch.dtype):
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_recurrent_kda

    if dtype == torch.float64:
        f = naive_recurrent_kda
        glb = dict(f.__globals__, torch=_Torch64("torch"))
        naive_recurrent_kda = types.FunctionType(f.__code__, glb, f.__name__, f.__defaults__,
                                                 f.__closure__)
    return naive_kda_gate, naive_recurrent_kda


# --------------------------------------------------------------------------------------------
# Layers (x: [T, hidden], already input-normed; each returns [T, hidden])
# --------------------------------------------------------------------------------------------


def kda_attention(m: RefModel, i: int, x: torch.Tensor) -> torch.Tensor:
    """Kimi Delta Attention, kimi-linear.md "KDA" steps 1-6, from a zero state."""
    naive_kda_gate, naive_recurrent_kda = _kda_ops(m.dtype)
    lin = m.config["linear_attn_config"]
    H, D = lin["num_heads"], lin["head_dim"]
    T = x.shape[0]
    a = f"model.layers.{i}.self_attn."
    W = lambda name: m.w[a + name]  # noqa: E731

    # 1. projections -> causal depthwise conv -> SiLU, per head
    q, k, v = (F.silu(causal_depthwise_conv(linear(x, W(f"{c}_proj.weight")), W(f"{c}_conv1d.weight")))
               .view(T, H, D) for c in "qkv")
    # 2. per-channel log decay: g = -exp(A_log) * softplus(f_b(f_a x) + dt_bias)
    g = naive_kda_gate(linear(linear(x, W("f_a_proj.weight")), W("f_b_proj.weight")).view(T, H, D),
                       W("A_log"), W("dt_bias"), output_dtype=m.dtype)
    # 3. beta in fp32 (or better)
    beta = torch.sigmoid(_hi(linear(x, W("b_proj.weight"))))
    # 4. L2-normalised q, k; the D^-0.5 scale is applied to q inside the recurrence
    q, k = l2_normalise(q), l2_normalise(k)
    # 5. the gated delta rule, token by token (batch of one)
    o, _ = naive_recurrent_kda(q[None], k[None], v[None], g[None], beta[None], scale=D ** -0.5)
    o = o[0].to(m.dtype)  # [T, H, D]
    # 6. per-head RMSNorm, output gate, o_proj
    gate = torch.sigmoid(linear(linear(x, W("g_a_proj.weight")), W("g_b_proj.weight"))).view(T, H, D)
    o = rms_norm(o, W("o_norm.weight"), m.eps) * gate
    return linear(o.reshape(T, H * D), W("o_proj.weight"))


def mla_attention(m: RefModel, i: int, x: torch.Tensor) -> torch.Tensor:
    """Multi-head latent attention without rotary embedding (NoPE), causal, written unabsorbed."""
    c = m.config
    n, nope, rope, vh, r = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                            c["v_head_dim"], c["kv_lora_rank"])
    T = x.shape[0]
    a = f"model.layers.{i}.self_attn."
    q = linear(x, m.w[a + "q_proj.weight"]).view(T, n, nope + rope)
    latent, k_rope = linear(x, m.w[a + "kv_a_proj_with_mqa.weight"]).split([r, rope], dim=-1)
    latent = rms_norm(latent, m.w[a + "kv_a_layernorm.weight"], m.eps)
    k_nope, v = linear(latent, m.w[a + "kv_b_proj.weight"]).view(T, n, nope + vh).split([nope, vh], -1)
    # k_rope is one head shared by all heads; the name is historical: no rotation is applied.
    k = torch.cat([k_nope, k_rope[:, None, :].expand(T, n, rope)], dim=-1)
    scores = torch.einsum("tnd,snd->nts", q, k) * (nope + rope) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    o = torch.einsum("nts,snd->tnd", p, v)
    return linear(o.reshape(T, n * vh), m.w[a + "o_proj.weight"])


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def moe(m: RefModel, i: int, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid router, bias for selection only, renormalised top-k times routed_scaling_factor."""
    c = m.config
    p = f"model.layers.{i}.block_sparse_moe."
    E, topk = c["num_experts"], c["num_experts_per_token"]
    scores = torch.sigmoid(_hi(linear(x, m.w[p + "gate.weight"], round_output=False)))               # [T, E]
    chosen = torch.topk(scores + _hi(m.w[p + "gate.e_score_correction_bias"]), topk, dim=-1).indices
    weights = scores.gather(-1, chosen)
    if c["moe_renormalize"]:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * c["routed_scaling_factor"]
    # Dense over experts (every expert on every token) for clarity; unchosen get weight 0.
    dense_w = torch.zeros_like(scores).scatter(-1, chosen, weights).to(x.dtype)  # [T, E]
    out = torch.zeros_like(x)
    for j in range(E):
        e = p + f"experts.{j}."
        out = out + dense_w[:, j:j + 1] * gated_mlp(x, m.w[e + "w1.weight"], m.w[e + "w3.weight"],
                                                     m.w[e + "w2.weight"])
    if c["num_shared_experts"]:
        s = p + "shared_experts."
        out = out + gated_mlp(x, m.w[s + "gate_proj.weight"], m.w[s + "up_proj.weight"],
                              m.w[s + "down_proj.weight"])
    return out


def decoder_layer(m: RefModel, i: int, x: torch.Tensor) -> torch.Tensor:
    p = f"model.layers.{i}."
    attn = kda_attention if i in m.kda else mla_attention
    h = x + attn(m, i, rms_norm(x, m.w[p + "input_layernorm.weight"], m.eps))
    y = rms_norm(h, m.w[p + "post_attention_layernorm.weight"], m.eps)
    if m.is_moe(i):
        f = moe(m, i, y)
    else:
        f = gated_mlp(y, m.w[p + "mlp.gate_proj.weight"], m.w[p + "mlp.up_proj.weight"],
                      m.w[p + "mlp.down_proj.weight"])
    return h + f


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def hidden_states(m: RefModel, input_ids) -> list[torch.Tensor]:
    """The residual stream after the embedding and after each layer ([T, hidden] each)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    x = m.w["model.embed_tokens.weight"][ids]
    out = [x]
    for i in range(m.config["num_hidden_layers"]):
        x = decoder_layer(m, i, x)
        out.append(x)
    return out


@torch.no_grad()
def forward(m: RefModel, input_ids) -> torch.Tensor:
    """Logits [T, vocab] (in the compute dtype) for a whole sequence, from empty state."""
    x = hidden_states(m, input_ids)[-1]
    return linear(rms_norm(x, m.w["model.norm.weight"], m.eps), m.w["lm_head.weight"])


def greedy_generate(m: RefModel, prompt_ids, max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """The new tokens of greedy decoding (full forward each step; ties go to the lower id).

    Stops early only when eos_token_id is given and produced (it is included in the result).
    """
    ids = [int(t) for t in prompt_ids]
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(forward(m, ids)[-1]))
        ids.append(nxt)
        new.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return new


def prompt_logprobs(m: RefModel, ids) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1, shape [T-1] (the first token has none)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    lp = torch.log_softmax(_hi(forward(m, ids)), dim=-1)
    return lp[:-1].gather(-1, ids[1:, None])[:, 0]


def num_parameters(m: RefModel) -> int:
    return sum(math.prod(t.shape) for t in m.w.values())
