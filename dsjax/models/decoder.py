"""The decoder-only language model shared by all families: embeddings, scanned blocks, final norm, LM head.

A family module (llama.py, gpt2.py) supplies `block_params`, `block`, `norm_params`, `final_norm` and
`LEARNED_POSITIONS`; everything else is common.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.models import gpt2, llama
from dsjax.models.layers import Group, ParamSpec, make_param
from dsjax.sharding import constrain

FAMILIES = {"llama": llama, "gpt2": gpt2}


class Decoder(nnx.Module):
    """tokens (B, T) int32 -> logits (B, T, V) float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        family = FAMILIES[cfg.family]
        D, V = cfg.d_model, cfg.vocab_size
        self.embed = make_param(ParamSpec((V, D), ("vocab", "embed")), cfg, rngs.params())
        if family.LEARNED_POSITIONS:
            self.positions = make_param(ParamSpec((cfg.max_seq_len, D), (None, "embed")), cfg, rngs.params())
        self.blocks = Group(family.block_params(cfg), cfg, rngs=rngs, stacked=True)
        self.final_norm = Group(family.norm_params(cfg), cfg, rngs=rngs, stacked=False)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(ParamSpec((D, V), ("embed", "vocab")), cfg, rngs.params())

    def __call__(self, tokens: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        cfg = self.cfg
        family = FAMILIES[cfg.family]
        act = ("act_batch", "act_seq", "act_embed")
        T = tokens.shape[1]
        positions = jnp.arange(T, dtype=jnp.int32)
        # Gather the table's FSDP shards first (ZeRO-3 does this for every weight before use); a gather from
        # a table split along D by the same axis that splits the batch would force a full replication.
        table = constrain(self.embed.get_value(), ("vocab", None), mesh)
        x = jnp.take(table, tokens, axis=0)  # (B, T, D)
        if family.LEARNED_POSITIONS:
            x = x + self.positions.get_value()[:T][None]
        x = constrain(x, act, mesh)

        def body(x, layer_params):
            return family.block(layer_params, x, positions, cfg, mesh), None

        x, _ = jax.lax.scan(body, x, self.blocks.arrays())
        x = family.final_norm(x, self.final_norm.arrays(), cfg)
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, self.embed.get_value())
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head.get_value())
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"), mesh)


def param_counts(state: nnx.State, cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters that take part in matmuls).

    The second is the N of the PaLM FLOPs count: the embedding table is a gather, not a matmul, so it is
    left out unless it is tied to the LM head; learned positions are a gather too and always left out.
    """
    total = matmul = 0
    for path, variable in nnx.to_flat_state(state):
        size = int(variable.get_value().size)
        total += size
        gather_only = path[0] == "positions" or (path[0] == "embed" and not cfg.tie_embeddings)
        matmul += 0 if gather_only else size
    return total, matmul
