"""The jitted train and eval steps: pure functions of (state, batch), with explicit shardings.

A batch is a (B, T+1) int32 array of token windows; inputs are the first T tokens, labels the last T.
The train state is donated, so its buffers are reused for the updated state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.sharding import named
from dsjax.state import TrainState

BATCH_AXES = ("act_batch", None)


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    """Sharding of a (B, T+1) token batch: rows split over data x fsdp."""
    return named(BATCH_AXES, (batch_size, seq_len + 1), mesh)


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array, mesh) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in fp32."""
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1], mesh)  # (B, T, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    shardings: TrainState,
    batch_shard: NamedSharding,
) -> Callable:
    """jit(train_step): (state, batch) -> (state, metrics), metrics as device scalars."""

    def train_step(state: TrainState, batch: jax.Array):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch, mesh))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, replicated), donate_argnums=0
    )


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, shardings: TrainState, batch_shard: NamedSharding
) -> Callable:
    """jit(eval_step): (params, batch) -> mean loss."""

    def eval_step(params: nnx.State, batch: jax.Array) -> jax.Array:
        return loss_fn(graphdef, params, batch, mesh)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(shardings.params, batch_shard), out_shardings=replicated)


def make_next_token(
    graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, shardings: TrainState, temperature: float
) -> Callable:
    """jit: (params, window (1, W) int32, position, key) -> the token sampled after window[0, position].

    The window has a fixed width W so sampling compiles once.
    """

    def next_token(params: nnx.State, window: jax.Array, position: jax.Array, key: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(window, mesh)[0, position]  # (V,)
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    return jax.jit(next_token, in_shardings=(shardings.params, None, None, None))
