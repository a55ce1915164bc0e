"""Mixed precision: dtype policies, `autocast`, and loss scaling (no-op, static, dynamic).

A `Policy` names three dtypes: `param` (the master weights the optimizer updates), `compute` (the dtype
of matmuls and activations) and `output` (the model's logits). The loss is always reduced in fp32.

Loss scaling keeps small fp16 gradients from flushing to zero: the loss is multiplied by a scale
before differentiation and the gradients divided by it afterwards. The scale lives in the train state
(`LossScaleState`, a pytree of arrays, so it survives jit and checkpoints). `DynamicLossScale` follows
PyTorch's GradScaler: halve on a non-finite step, double after `growth_interval` finite ones, and here
also stay within [min_scale, max_scale]. A non-finite step is skipped with `jnp.where`, so params and
optimizer state stay bit-for-bit unchanged; this holds for every policy, not only fp16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dsjax.config import ConfigError

DTYPES = {
    "f32": jnp.float32, "fp32": jnp.float32, "float32": jnp.float32,
    "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
    "f16": jnp.float16, "fp16": jnp.float16, "float16": jnp.float16,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Policy:
    param: jnp.dtype
    compute: jnp.dtype
    output: jnp.dtype

    def __str__(self) -> str:
        short = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}
        return f"p={short[self.param]},c={short[self.compute]},o={short[self.output]}"


def _policy(param, compute, output) -> Policy:
    return Policy(jnp.dtype(param), jnp.dtype(compute), jnp.dtype(output))


POLICIES: dict[str, Policy] = {
    "fp32": _policy(jnp.float32, jnp.float32, jnp.float32),
    "bf16": _policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": _policy(jnp.float32, jnp.float16, jnp.float32),
    "pure-bf16": _policy(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
}


def parse_policy(text: str) -> Policy:
    """A named policy ('bf16', ...) or the explicit form 'p=f32,c=bf16,o=f32'."""
    if text in POLICIES:
        return POLICIES[text]
    parts = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    if set(parts) != {"p", "c", "o"} or len(text.split(",")) != 3 or any(v not in DTYPES for v in parts.values()):
        raise ConfigError(
            f"precision.policy={text!r} is neither a named policy ({', '.join(POLICIES)}) nor of the form "
            "'p=f32,c=bf16,o=f32' (param, compute and output dtype, each one of f32, bf16, f16)."
        )
    if DTYPES[parts["p"]] == jnp.float16:
        raise ConfigError(
            f"precision.policy={text!r}: fp16 master weights are not supported (AdamW's epsilon and small "
            "updates underflow in fp16 and turn into NaN); keep p=f32 with c=f16, the 'fp16' policy."
        )
    return _policy(DTYPES[parts["p"]], DTYPES[parts["c"]], DTYPES[parts["o"]])


# ----------------------------------------------------------------------------------------------------
# autocast: the compute dtype for dsjax modules, read when a function is traced.

# A jit-cache-sensitive context: a function traced under one compute dtype is retraced under another.
_COMPUTE_DTYPE = jax.make_user_context(default_value=None)


class autocast(contextlib.ContextDecorator):
    """Run dsjax modules inside it with `dtype` as their compute dtype (context manager or decorator).

    Like the seed's `ds.amp.autocast()`: `with autocast(jnp.bfloat16): logits = model(tokens)`. The
    dtype is part of JAX's compilation cache key, so a jitted function called inside and outside an
    autocast is traced once for each dtype.
    """

    def __init__(self, dtype=jnp.bfloat16):
        self.dtype = jnp.dtype(dtype)
        self._contexts: list = []

    def __enter__(self):
        context = _COMPUTE_DTYPE(self.dtype)
        context.__enter__()
        self._contexts.append(context)
        return self

    def __exit__(self, *exc):
        return self._contexts.pop().__exit__(*exc)


def compute_dtype(default) -> jnp.dtype:
    """The dtype set by the innermost `autocast`, else `default`."""
    dtype = _COMPUTE_DTYPE.value
    return jnp.dtype(default) if dtype is None else dtype


# ----------------------------------------------------------------------------------------------------
# Loss scaling.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossScaleState:
    scale: jax.Array  # f32 scalar: the loss is multiplied by this before differentiation
    good_steps: jax.Array  # i32: finite steps since the scale last changed
    skipped_steps: jax.Array  # i32: non-finite steps skipped so far (cumulative, any policy)
    consecutive_skips: jax.Array  # i32: non-finite steps in a row, 0 after a finite one


def _state(scale: float) -> LossScaleState:
    zero = jnp.zeros((), jnp.int32)
    return LossScaleState(jnp.asarray(scale, jnp.float32), zero, zero, zero)


def all_finite(tree) -> jax.Array:
    """True iff every element of every leaf is finite (a replicated bool scalar under jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _count(state: LossScaleState, finite: jax.Array, scale: jax.Array, good: jax.Array) -> LossScaleState:
    finite = jnp.asarray(finite, dtype=bool)
    skipped = (~finite).astype(jnp.int32)
    return LossScaleState(
        scale=scale,
        good_steps=good,
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )


@dataclasses.dataclass(frozen=True)
class StaticLossScale:
    """A fixed scale; non-finite steps are still counted (and so skipped)."""

    scale: float = 2.0**15

    def __post_init__(self):
        if not (0 < self.scale < math.inf):
            raise ConfigError(f"precision.init_scale must be a finite number > 0 for a static scale, got {self.scale}.")

    def init(self) -> LossScaleState:
        return _state(self.scale)

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        return _count(state, finite, state.scale, state.good_steps)


@dataclasses.dataclass(frozen=True)
class NoOpLossScale(StaticLossScale):
    """No loss scaling: a static scale of 1 (the skipped-step counters still run)."""

    scale: float = dataclasses.field(default=1.0, init=False)


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """PyTorch GradScaler's rule (its defaults), bounded to [min_scale, max_scale]."""

    init_scale: float = 2.0**16
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    max_scale: float = 2.0**32

    def __post_init__(self):
        checks = [
            (self.init_scale > 0, f"precision.init_scale must be > 0, got {self.init_scale}."),
            (self.growth_interval >= 1, f"precision.growth_interval must be >= 1, got {self.growth_interval}."),
            (self.growth_factor > 1, f"precision.growth_factor must be > 1, got {self.growth_factor}."),
            (0 < self.backoff_factor < 1, f"precision.backoff_factor must be in (0, 1), got {self.backoff_factor}."),
            (0 < self.min_scale <= self.max_scale < math.inf,
             f"precision.min_scale ({self.min_scale}) must be > 0 and <= precision.max_scale ({self.max_scale}), "
             "which must be finite."),
            (self.min_scale <= self.init_scale < math.inf,
             f"precision.init_scale ({self.init_scale}) must be finite and >= precision.min_scale ({self.min_scale})."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def init(self) -> LossScaleState:
        # The initial scale may lie above max_scale on purpose (it then backs off); it is not clamped.
        return _state(self.init_scale)

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        finite = jnp.asarray(finite, dtype=bool)
        good = state.good_steps + 1
        grow = finite & (good >= self.growth_interval)
        grown = jnp.minimum(state.scale * self.growth_factor, self.max_scale)
        backed_off = jnp.maximum(state.scale * self.backoff_factor, self.min_scale)
        scale = jnp.where(finite, jnp.where(grow, grown, state.scale), backed_off)
        return _count(state, finite, scale, jnp.where(finite & ~grow, good, 0))


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def loss_scale_from_config(precision) -> LossScale:
    """The loss scale a PrecisionConfig asks for ('auto': dynamic when computing in fp16)."""
    kind = precision.loss_scale
    if kind == "auto":
        kind = "dynamic" if parse_policy(precision.policy).compute == jnp.dtype(jnp.float16) else "none"
    if kind == "none":
        return NoOpLossScale()
    if kind == "static":
        return StaticLossScale(precision.init_scale)
    return dynamic_loss_scale(precision)


def dynamic_loss_scale(precision) -> DynamicLossScale:
    """The dynamic loss scale with a PrecisionConfig's numbers."""
    return DynamicLossScale(
        init_scale=precision.init_scale,
        growth_interval=precision.growth_interval,
        growth_factor=precision.growth_factor,
        backoff_factor=precision.backoff_factor,
        min_scale=precision.min_scale,
        max_scale=precision.max_scale,
    )


class GradientScaler:
    """The seed's `GradientScaler` in functional form, for users who write their own train step.

    PyTorch-style call                      dsjax
    scaler = GradientScaler()               scaler = GradientScaler(); ls = scaler.init()
    scaler.scale(loss).backward()           grads = jax.grad(lambda p: scaler.scale(loss_fn(p), ls))(params)
    scaler.unscale_(optimizer)              grads = scaler.unscale(grads, ls)
    scaler.step(optimizer)                  params, opt_state, finite = scaler.step(tx, grads, opt_state, params)
    scaler.update()                         ls = scaler.update(ls, finite)

    `step` unscales nothing itself: pass it unscaled gradients. It applies the optax update only if
    every gradient is finite and otherwise returns params and opt_state unchanged. The dsjax train step
    is built from these same calls.
    """

    def __init__(self, loss_scale: LossScale | None = None):
        self.loss_scale = loss_scale if loss_scale is not None else DynamicLossScale()

    def init(self) -> LossScaleState:
        return self.loss_scale.init()

    @staticmethod
    def scale(loss: jax.Array, state: LossScaleState) -> jax.Array:
        return loss.astype(jnp.float32) * state.scale

    @staticmethod
    def unscale(grads, state: LossScaleState):
        inv = 1.0 / state.scale
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

    @staticmethod
    def step(tx, grads, opt_state, params, grad_norm: jax.Array | None = None):
        """(params, opt_state, finite): the optax update applied only if every gradient is finite.

        With `grad_norm` (the global norm, which a train step computes anyway), finiteness is read from
        it: a norm is finite exactly when every gradient is (barring squares beyond fp32's range, ~1e19
        per element, which is treated as overflow too), and no extra pass over the gradients is needed.
        """
        finite = all_finite(grads) if grad_norm is None else jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        return keep(new_params, params), keep(new_opt_state, opt_state), finite

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        return self.loss_scale.update(state, finite)
