"""The train state and its born-sharded initialisation.

Nothing full-size is ever materialised on one device: the model is first built abstractly
(`nnx.eval_shape`), the sharding of every leaf is resolved from its logical axis names, and the real
initialisation runs inside `jax.jit(..., out_shardings=...)`, so each device only creates its shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.config import Config
from dsjax.models import Decoder
from dsjax.precision import LossScale, LossScaleState, parse_policy
from dsjax.sharding import state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: train steps run (batches consumed), skipped ones included
    params: nnx.State  # the model's nnx.Param variables (fp32 master weights)
    opt_state: Any  # optax state; param-shaped leaves share the params' shardings
    loss_scale: LossScaleState  # loss scale and skipped-step counters (scale 1 without loss scaling)


def make_model(config: Config, rngs: nnx.Rngs) -> Decoder:
    """The model a config describes: shape, precision policy and remat policy."""
    return Decoder(
        config.model,
        rngs=rngs,
        policy=parse_policy(config.precision.policy),
        remat_policy=config.remat.policy,
        remat_every=config.remat.every,
        remat_prevent_cse=config.remat.prevent_cse,
        pipeline=config.pipeline,
    )


def abstract_model(config: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) without allocating anything."""
    model = nnx.eval_shape(lambda: make_model(config, nnx.Rngs(config.train.seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def state_sharding_tree(
    abstract: TrainState, params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """Shardings for every leaf of the train state: params by their logical axes, optimizer moments
    like their params (FSDP shards them too), everything else (step, counters) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = state_shardings(params, mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    loss_scale = jax.tree.map(lambda _: replicated, abstract.loss_scale)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, loss_scale=loss_scale)


def init_fn(config: Config, tx: optax.GradientTransformation, loss_scale: LossScale):
    def init() -> TrainState:
        params = nnx.state(make_model(config, nnx.Rngs(config.train.seed)), nnx.Param)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), loss_scale=loss_scale.init()
        )

    return init


def create_train_state(
    config: Config, tx: optax.GradientTransformation, loss_scale: LossScale, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, sharded train state, its sharding tree). Each device initialises only its shard."""
    graphdef, params = abstract_model(config)
    init = init_fn(config, tx, loss_scale)
    shardings = state_sharding_tree(jax.eval_shape(init), params, tx, mesh)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def abstract_train_state(
    config: Config, tx: optax.GradientTransformation, loss_scale: LossScale, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Like `create_train_state` but only shapes with shardings (for --dry-run compilation)."""
    graphdef, params = abstract_model(config)
    abstract = jax.eval_shape(init_fn(config, tx, loss_scale))
    shardings = state_sharding_tree(abstract, params, tx, mesh)
    with_shardings = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, with_shardings, shardings
