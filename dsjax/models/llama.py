"""The llama family: pre-RMSNorm blocks, RoPE, grouped-query attention, SwiGLU MLP, no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsjax.config import ModelConfig
from dsjax.models.layers import ParamSpec, cast, causal_attention, project, recomputed, rope
from dsjax.models.norms import add_norm
from dsjax.sharding import constrain

LEARNED_POSITIONS = False
KEEP = ("attn_norm", "mlp_norm")  # block parameters used in their own dtype (fp32 norms), not the compute dtype
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # block weights used only through `project`


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


def final_norm(x: jax.Array, p: dict[str, jax.Array], cfg: ModelConfig, mesh=None) -> jax.Array:
    return add_norm(x, None, p["scale"], None, cfg.norm_eps, impl=cfg.norm_kernel, mesh=mesh)[1]


def norm_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    return {"scale": ParamSpec((cfg.d_model,), ("norm",), "ones")}


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up. In fp16 it is differentiated by `_swiglu_recomputed`; in other dtypes by autodiff.

    Under autodiff in fp16, the compiled llama-1b step merges the backward pass's recomputed sigmoid with the
    forward pass's. It then keeps the forward pass's (B, T, F) result alive for the backward pass: one
    activation more per layer. By default the remat groups of unrolled layers run with prevent_cse=False
    (`dsjax.remat`, remat.prevent_cse), which allows such merges. In bf16 the two were not merged.

    Measured on llama-1b at batch 12, one H200 (experiments/RESULTS.md). In fp16 the step took 66.5 GiB
    under autodiff and 63.5 GiB with `_swiglu_recomputed`. In bf16 autodiff took 60.5 GiB and the custom VJP
    63.5 GiB, so bf16 (and fp32, not measured) keep autodiff."""
    return (_swiglu_recomputed if gate.dtype == jnp.float16 else _silu_times)(gate, up)


def _silu_times(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


_swiglu_recomputed = recomputed(_silu_times)  # gate and up its only residuals, the sigmoid again behind a barrier


def block(p: dict[str, jax.Array], x: jax.Array, positions: jax.Array, cfg: ModelConfig, mesh) -> jax.Array:
    """One decoder block in x's dtype. p: this layer's parameters, x (B, T, D), positions (T,) -> (B, T, D)."""
    p = cast(p, x.dtype, keep=KEEP)
    act = ("act_batch", "act_seq", "act_embed")
    heads, kv_heads = ("act_batch", "act_seq", "act_heads", None), ("act_batch", "act_seq", "act_kv_heads", None)
    norm = dict(eps=cfg.norm_eps, impl=cfg.norm_kernel, mesh=mesh)
    _, h = add_norm(x, None, p["attn_norm"], None, **norm)
    q = checkpoint_name(constrain(project("BTD,DNH->BTNH", h, p["wq"]), heads, mesh), "query_proj")
    k = checkpoint_name(constrain(project("BTD,DKH->BTKH", h, p["wk"]), kv_heads, mesh), "key_proj")
    v = checkpoint_name(constrain(project("BTD,DKH->BTKH", h, p["wv"]), kv_heads, mesh), "value_proj")
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    o = checkpoint_name(causal_attention(q, k, v, cfg.attention), "context")  # (B, T, N, H)
    out = checkpoint_name(constrain(project("BTNH,NHD->BTD", o, p["wo"]), act, mesh), "out_proj")
    x, h = add_norm(x, out, p["mlp_norm"], None, **norm)  # x + out and its RMSNorm in one pass
    gate = checkpoint_name(project("BTD,DF->BTF", h, p["w_gate"]), "mlpwi_0")
    up = checkpoint_name(project("BTD,DF->BTF", h, p["w_up"]), "mlpwi_1")
    hidden = constrain(swiglu(gate, up), ("act_batch", "act_seq", "act_mlp"), mesh)
    return x + checkpoint_name(constrain(project("BTF,FD->BTD", hidden, p["w_down"]), act, mesh), "mlpwo")
