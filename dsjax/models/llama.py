"""The llama family: pre-RMSNorm blocks, RoPE, grouped-query attention, SwiGLU MLP, no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.models.layers import ParamSpec, causal_attention, rms_norm, rope
from dsjax.sharding import constrain

LEARNED_POSITIONS = False


def block_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return {
        "attn_norm": ParamSpec((D,), ("norm",), "ones"),
        "wq": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
        "wk": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((N, H, D), ("heads", "head_dim", "embed"), "residual"),
        "mlp_norm": ParamSpec((D,), ("norm",), "ones"),
        "w_gate": ParamSpec((D, F), ("embed", "mlp")),
        "w_up": ParamSpec((D, F), ("embed", "mlp")),
        "w_down": ParamSpec((F, D), ("mlp", "embed"), "residual"),
    }


def final_norm(x: jax.Array, p: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, p["scale"], cfg.norm_eps)


def norm_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    return {"scale": ParamSpec((cfg.d_model,), ("norm",), "ones")}


def block(p: dict[str, jax.Array], x: jax.Array, positions: jax.Array, cfg: ModelConfig, mesh) -> jax.Array:
    """One decoder block. p: this layer's parameters, x (B, T, D), positions (T,) -> (B, T, D)."""
    act = ("act_batch", "act_seq", "act_embed")
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = constrain(jnp.einsum("BTD,DNH->BTNH", h, p["wq"]), ("act_batch", "act_seq", "act_heads", None), mesh)
    k = constrain(jnp.einsum("BTD,DKH->BTKH", h, p["wk"]), ("act_batch", "act_seq", "act_kv_heads", None), mesh)
    v = constrain(jnp.einsum("BTD,DKH->BTKH", h, p["wv"]), ("act_batch", "act_seq", "act_kv_heads", None), mesh)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    o = causal_attention(q, k, v, cfg.attention)  # (B, T, N, H)
    x = constrain(x + jnp.einsum("BTNH,NHD->BTD", o, p["wo"]), act, mesh)

    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    gate = jnp.einsum("BTD,DF->BTF", h, p["w_gate"])
    up = jnp.einsum("BTD,DF->BTF", h, p["w_up"])
    hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"), mesh)
    return constrain(x + jnp.einsum("BTF,FD->BTD", hidden, p["w_down"]), act, mesh)
