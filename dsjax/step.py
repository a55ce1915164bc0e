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

from dsjax import pipeline, pipeline_1f1b
from dsjax.precision import GradientScaler, LossScale
from dsjax.sharding import constrain, named
from dsjax.state import TrainState

BATCH_AXES = ("act_batch", None)


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    """Sharding of a (B, T+1) token batch: rows split over data x fsdp."""
    return named(BATCH_AXES, (batch_size, seq_len + 1), mesh)


def microbatches(batch: jax.Array, count: int, mesh: jax.sharding.Mesh | None, logical=BATCH_AXES) -> jax.Array:
    """A (B, ...) batch as `count` microbatches (count, B / count, ...): microbatch k holds rows k,
    k + count, k + 2 count, ... so that every device's contiguous share of the rows splits evenly into
    all microbatches and no row moves between devices. `logical` names the batch's own axes."""
    rows = batch.shape[0]
    split = batch.reshape(rows // count, count, *batch.shape[1:]).swapaxes(0, 1)
    return constrain(split, (None, *logical), mesh)


def merge_microbatches(split: jax.Array, mesh: jax.sharding.Mesh | None, logical=BATCH_AXES) -> jax.Array:
    """The inverse of `microbatches`: (count, B / count, ...) -> (B, ...) in the original row order."""
    count, rows = split.shape[:2]
    merged = split.swapaxes(0, 1).reshape(count * rows, *split.shape[2:])
    return constrain(merged, logical, mesh)


def next_token_loss(logits: jax.Array, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, reduced in fp32. logits (B, T, V), batch (B, T+1)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()


def lm_loss(model, batch: jax.Array, mesh, chunk: int = 0) -> jax.Array:
    """Mean next-token cross-entropy of `model` on `batch` (B, T+1), through the model's fused LM head +
    loss (`Decoder.token_losses`); equal to `next_token_loss` of its logits.

    With 0 < chunk < T the head and the loss run over `chunk` positions at a time and the backward pass
    recomputes each chunk's logits instead of storing them, so the whole (B, T, V) logits never exist: for
    large vocabularies they are the largest activation of the step.
    """
    x, labels = model.features(batch[:, :-1], mesh), batch[:, 1:]  # (B, T, D), (B, T)
    head = model.head()
    B, T, D = x.shape
    if not 0 < chunk < T:
        return model.token_losses(x, head, labels, mesh).mean()
    n = T // chunk
    xs = x.reshape(B, n, chunk, D).swapaxes(0, 1)  # (n, B, c, D)
    ys = labels.reshape(B, n, chunk).swapaxes(0, 1)  # (n, B, c)

    # Under checkpoint the forward pass is run again in the backward pass, so the logits' gradient that the
    # forward writes is thrown away once: XLA's implementation skips writing it there (the Pallas kernel
    # cannot), and its loss-only forward pass reads the logits once instead of twice.
    kernel = "xla" if model.cfg.loss_kernel == "auto" else None

    @jax.checkpoint
    def one(total, xy):
        return total + model.token_losses(xy[0], head, xy[1], mesh, kernel).sum(), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (xs, ys))
    return total / (B * T)


def loss_fn(
    graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array, mesh, objective: Callable | None = None, chunk: int = 0
) -> jax.Array:
    """The training loss; the model computes in its precision policy's dtype.

    Without `objective`: next-token cross-entropy (`lm_loss`), in chunks of `chunk` positions when
    0 < chunk < T. With one: objective(logits, batch) over the full logits (custom losses, tests).
    """
    model = nnx.merge(graphdef, params)
    if objective is None:
        return lm_loss(model, batch, mesh, chunk)
    return objective(model(batch[:, :-1], mesh), batch)


def _norm(tree) -> jax.Array:
    """Global L2 norm, accumulated in fp32 even for bf16 leaves."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def apply_gradients(
    state: TrainState,
    loss: jax.Array,
    grads,
    tx: optax.GradientTransformation,
    scaler: GradientScaler,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict]:
    """The step after differentiation: unscale the (loss-scaled) gradients, apply the optimizer's update
    only if every gradient is finite, update the loss scale, and the step's metrics."""
    grads = scaler.unscale(grads, state.loss_scale)
    grad_norm = _norm(grads)
    params, opt_state, finite = scaler.step(tx, grads, state.opt_state, state.params, grad_norm)
    loss_scale_state = scaler.update(state.loss_scale, finite)
    applied = state.step - state.loss_scale.skipped_steps  # optimizer updates before this step
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": _norm(params),
        "update_norm": _norm(jax.tree.map(lambda new, old: new.astype(jnp.float32) - old, params, state.params)),
        "lr": schedule(applied),
        "loss_scale": state.loss_scale.scale,
        "skipped_steps": loss_scale_state.skipped_steps,
        "consecutive_skips": loss_scale_state.consecutive_skips,
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale_state)
    return new_state, metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    shardings: TrainState,
    batch_shard: NamedSharding,
    loss_scale: LossScale,
    objective: Callable | None = None,
    chunk: int = 0,
    accum: int = 1,
    plan: pipeline.Plan | None = None,
) -> Callable:
    """jit(train_step): (state, batch) -> (state, metrics), metrics as device scalars.

    With a 1F1B pipeline `plan`, the loss and gradients come from `pipeline_1f1b.value_and_grad_1f1b` (its
    schedule interleaves the backward pass with the forward pass) instead of autodiff of the model.

    With accum > 1 the batch is split into `accum` microbatches (`microbatches`) whose gradients are
    summed in fp32 in a loop and averaged before the one optimizer update: the same update as the whole
    batch at once (the loss is a mean over equal-sized microbatches), with the activations of one
    microbatch alive at a time.

    The step is the seed's GradientScaler sequence: scale the loss, differentiate, unscale, apply the
    update only if every gradient is finite, update the scale. The gradients it tests are the global
    ones (jit has already reduced them across replicas), so every replica makes the same decision.
    Clipping (inside `tx`) sees unscaled gradients.
    """
    scaler = GradientScaler(loss_scale)
    one_f_one_b = plan is not None and plan.schedule == "1f1b" and objective is None

    def train_step(state: TrainState, batch: jax.Array):
        def scaled(params, batch):
            loss = loss_fn(graphdef, params, batch, mesh, objective, chunk)
            return scaler.scale(loss, state.loss_scale), loss

        def loss_and_grads(params, batch):
            if one_f_one_b:
                seed = scaler.scale(jnp.ones((), jnp.float32), state.loss_scale)
                return pipeline_1f1b.value_and_grad_1f1b(graphdef, params, batch, mesh, plan, seed)
            (_, loss), grads = jax.value_and_grad(scaled, has_aux=True)(params, batch)
            return loss, grads

        if accum == 1:
            loss, grads = loss_and_grads(state.params, batch)
        else:

            def add(carry, micro):
                loss, grads = loss_and_grads(state.params, micro)
                total, summed = carry
                return (total + loss, jax.tree.map(lambda s, g: s + g.astype(jnp.float32), summed, grads)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            init = (jnp.zeros((), jnp.float32), zeros)
            (total, summed), _ = jax.lax.scan(add, init, microbatches(batch, accum, mesh))
            loss = total / accum
            grads = jax.tree.map(lambda s, p: (s / accum).astype(p.dtype), summed, state.params)
        return apply_gradients(state, loss, grads, tx, scaler, schedule)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, replicated), donate_argnums=0
    )


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, shardings: TrainState, batch_shard: NamedSharding, chunk: int = 0
) -> Callable:
    """jit(eval_step): (params, batch) -> mean loss."""

    def eval_step(params: nnx.State, batch: jax.Array) -> jax.Array:
        return loss_fn(graphdef, params, batch, mesh, chunk=chunk)

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
