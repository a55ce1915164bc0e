"""The optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay.

`GradientScaler` (the seed's dynamic loss scaler, for hand-written train steps) is re-exported here
from dsjax.precision, where it is defined.

Weight decay applies to the weight matrices only; norms and biases are left alone. Each parameter
declares this itself (`decay` metadata, set by the model from its initializer), so the mask needs no
list of names.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from dsjax.config import TrainConfig
from dsjax.precision import DynamicLossScale, GradientScaler, NoOpLossScale, StaticLossScale

__all__ = ["DynamicLossScale", "GradientScaler", "NoOpLossScale", "StaticLossScale", "make_optimizer", "schedule"]


def schedule(train: TrainConfig) -> optax.Schedule:
    """Learning rate at each step: 0 -> train.lr over the warmup, cosine down to lr * min_lr_ratio."""
    warmup = min(train.warmup_steps, train.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=warmup,
        decay_steps=max(train.steps, warmup + 1),
        end_value=train.lr * train.min_lr_ratio,
    )


def decay_mask(params: nnx.State):
    """True for parameters that take weight decay (a prefix tree of `params`)."""
    return jax.tree.map(
        lambda v: bool(v.get_metadata().get("decay", False)), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule(train),
        b1=train.beta1,
        b2=train.beta2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=decay_mask,
    )
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    return adamw
