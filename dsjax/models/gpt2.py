"""The gpt2 family: pre-LayerNorm blocks with biases, learned positions, multi-head attention, GELU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsjax.config import ModelConfig
from dsjax.models.gelu import bias_gelu
from dsjax.models.layers import ParamSpec, Precast, cast, causal_attention, project
from dsjax.models.norms import add_norm
from dsjax.models.qkv import split_qkv
from dsjax.sharding import constrain

LEARNED_POSITIONS = True
KEEP = ("ln1_scale", "ln1_bias", "ln2_scale", "ln2_bias")  # block parameters the block does not cast
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_fc", "w_proj")  # block weights used only through `project`


def block_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    return {
        "ln1_scale": ParamSpec((D,), ("norm",), "ones"),
        "ln1_bias": ParamSpec((D,), ("norm",), "zeros"),
        "wq": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
        "wk": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
        "wv": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
        "bq": ParamSpec((N, H), ("heads", "head_dim"), "zeros"),
        "bk": ParamSpec((N, H), ("heads", "head_dim"), "zeros"),
        "bv": ParamSpec((N, H), ("heads", "head_dim"), "zeros"),
        "wo": ParamSpec((N, H, D), ("heads", "head_dim", "embed"), "residual"),
        "bo": ParamSpec((D,), ("norm",), "zeros"),
        "ln2_scale": ParamSpec((D,), ("norm",), "ones"),
        "ln2_bias": ParamSpec((D,), ("norm",), "zeros"),
        "w_fc": ParamSpec((D, F), ("embed", "mlp")),
        "b_fc": ParamSpec((F,), ("mlp",), "zeros"),
        "w_proj": ParamSpec((F, D), ("mlp", "embed"), "residual"),
        "b_proj": ParamSpec((D,), ("norm",), "zeros"),
    }


def norm_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    return {
        "scale": ParamSpec((cfg.d_model,), ("norm",), "ones"),
        "bias": ParamSpec((cfg.d_model,), ("norm",), "zeros"),
    }


def final_norm(x: jax.Array, p: dict[str, jax.Array], cfg: ModelConfig, mesh=None) -> jax.Array:
    return add_norm(x, None, p["scale"], p["bias"], cfg.norm_eps, impl=cfg.norm_kernel, mesh=mesh)[1]


def qkv_projections(h: jax.Array, p: dict, impl: str = "xla", mesh=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v (B, T, N, H) = h (B, T, D) times wq, wk, wv, plus their biases.

    One GEMM against the three weights stacked (D, 3, N, H), as GPT-2's own c_attn is one matrix: at D = 768
    three 768-wide GEMMs run well under cuBLAS's large-GEMM rate, and one 2304-wide GEMM (with its one
    weight-gradient and input-gradient GEMM) made gpt2-124m's step 1.2% faster on an H200
    (experiments/RESULTS.md). The bias add, which splits the three apart, is a pass the block ran anyway; its
    backward pass is `dsjax.models.qkv.split_qkv`'s (`impl`: model.qkv_kernel).
    `Precast` weights (a pipeline's, cast once before its loop) are stacked as one `Precast`, so the
    pipelined block computes what the plain one does, bit for bit."""
    ws = [p[n] for n in ("wq", "wk", "wv")]
    if all(isinstance(w, Precast) for w in ws):
        w = Precast(jnp.stack([w.master for w in ws], axis=1), jnp.stack([w.compute for w in ws], axis=1))
    else:
        w = jnp.stack(ws, axis=1)
    qkv = project("BTD,DSNH->BTSNH", h, w)
    return split_qkv(qkv, jnp.stack([p["bq"], p["bk"], p["bv"]]), impl=impl, mesh=mesh)


def block(p: dict[str, jax.Array], x: jax.Array, positions: jax.Array, cfg: ModelConfig, mesh) -> jax.Array:
    """One decoder block in x's dtype. p: this layer's parameters, x (B, T, D), positions (unused) -> (B, T, D)."""
    del positions  # GPT-2 adds learned positions once, at the embedding
    p = cast(p, x.dtype, keep=KEEP)
    act = ("act_batch", "act_seq", "act_embed")
    heads = ("act_batch", "act_seq", "act_heads", None)
    norm = dict(eps=cfg.norm_eps, impl=cfg.norm_kernel, mesh=mesh)
    _, h = add_norm(x, None, p["ln1_scale"], p["ln1_bias"], **norm)
    q, k, v = (
        checkpoint_name(constrain(a, heads, mesh), name)
        for a, name in zip(
            qkv_projections(h, p, cfg.qkv_kernel, mesh), ("query_proj", "key_proj", "value_proj"), strict=True
        )
    )
    o = checkpoint_name(causal_attention(q, k, v, cfg.attention), "context")  # (B, T, N, H)
    out = checkpoint_name(constrain(project("BTNH,NHD->BTD", o, p["wo"]), act, mesh), "out_proj")
    # x + (out + bo) and its LayerNorm in one pass (dsjax.models.norms)
    x, h = add_norm(x, out, p["ln2_scale"], p["ln2_bias"], y_bias=p["bo"], **norm)
    hidden = checkpoint_name(project("BTD,DF->BTF", h, p["w_fc"]), "mlpwi_0")
    hidden = bias_gelu(hidden, p["b_fc"], impl=cfg.gelu_kernel, mesh=mesh)
    hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"), mesh)
    out = project("BTF,FD->BTD", hidden, p["w_proj"]) + p["b_proj"]
    return x + checkpoint_name(constrain(out, act, mesh), "mlpwo")
