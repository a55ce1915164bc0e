"""Mixed precision: policy parsing, the loss-scale state machines, GradientScaler, autocast, CheckpointModule.

The dynamic loss-scale table below is worked out by hand from the rule in dsjax.precision's docstring
(PyTorch's GradScaler, bounded to [min_scale, max_scale]); it is deliberately not recomputed in code.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import dsjax.amp
from dsjax.config import ConfigError, ModelConfig, PrecisionConfig
from dsjax.models import Decoder
from dsjax.nn import CheckpointModule
from dsjax.precision import (
    POLICIES,
    DynamicLossScale,
    GradientScaler,
    LossScaleState,
    NoOpLossScale,
    Policy,
    StaticLossScale,
    all_finite,
    autocast,
    compute_dtype,
    loss_scale_from_config,
    parse_policy,
)

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def flag(value: bool) -> jax.Array:
    return jnp.asarray(value, dtype=bool)


def as_tuple(state: LossScaleState) -> tuple[float, int, int, int]:
    return (float(state.scale), int(state.good_steps), int(state.skipped_steps), int(state.consecutive_skips))


# ----------------------------------------------------------------------------------------------------
# 1. Policies


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fp32", (F32, F32, F32)),
        ("bf16", (F32, BF16, F32)),
        ("fp16", (F32, F16, F32)),
        ("pure-bf16", (BF16, BF16, BF16)),
        ("p=f32,c=bf16,o=f32", (F32, BF16, F32)),
        ("p=bf16,c=f16,o=f32", (BF16, F16, F32)),
        ("p=f32,c=f16,o=bf16", (F32, F16, BF16)),
        ("p=float32,c=bfloat16,o=fp32", (F32, BF16, F32)),
    ],
)
def test_parse_policy_dtypes(name, expected):
    policy = parse_policy(name)
    assert isinstance(policy, Policy)
    assert (policy.param, policy.compute, policy.output) == expected
    # the fields are real numpy dtypes, comparable with ==
    for dtype in (policy.param, policy.compute, policy.output):
        assert isinstance(dtype, np.dtype)


@pytest.mark.parametrize("name", [*POLICIES, "p=bf16,c=f16,o=f32", "p=bf16,c=f32,o=f16"])
def test_policy_str_round_trips(name):
    policy = parse_policy(name)
    text = str(policy)
    assert re.fullmatch(r"p=\w+,c=\w+,o=\w+", text)
    assert parse_policy(text) == policy


def test_named_policy_strings():
    assert str(POLICIES["bf16"]) == "p=f32,c=bf16,o=f32"
    assert str(POLICIES["pure-bf16"]) == "p=bf16,c=bf16,o=bf16"
    assert str(POLICIES["fp16"]) == "p=f32,c=f16,o=f32"


@pytest.mark.parametrize(
    "text",
    [
        "p=f32",
        "p=f32,c=bf17,o=f32",
        "bf32",
        "p=f32,c=bf16,o=f32,x=1",
        "",
        "p=f32,c=bf16,c=f32",
        "p=f32,c=bf16,o=f32,",
        "p=f32,c=bf16,q=f32",
        "BF16",
    ],
)
def test_parse_policy_rejects_malformed(text):
    with pytest.raises(ConfigError, match=r"precision\.policy"):
        parse_policy(text)


def test_amp_reexports_precision():
    assert dsjax.amp.autocast is autocast
    assert dsjax.amp.compute_dtype is compute_dtype
    assert dsjax.amp.parse_policy is parse_policy


# ----------------------------------------------------------------------------------------------------
# 2. Loss-scale state machines

# DynamicLossScale(init_scale=8, growth_interval=3, growth_factor=2, backoff_factor=0.5, min_scale=1,
# max_scale=32). Each row: finite flag fed at this step, then the state after it:
# (scale, good_steps, skipped_steps, consecutive_skips). Start: (8, 0, 0, 0).
T, F = True, False
DYNAMIC_SCRIPT = [
    (T, 8.0, 1, 0, 0),
    (T, 8.0, 2, 0, 0),
    (T, 16.0, 0, 0, 0),  # third finite step: grow x2, good_steps reset
    (T, 16.0, 1, 0, 0),
    (F, 8.0, 0, 1, 1),  # back off x0.5, good_steps reset
    (T, 8.0, 1, 1, 0),  # consecutive_skips reset by a finite step
    (T, 8.0, 2, 1, 0),
    (T, 16.0, 0, 1, 0),
    (F, 8.0, 0, 2, 1),
    (F, 4.0, 0, 3, 2),
    (F, 2.0, 0, 4, 3),
    (F, 1.0, 0, 5, 4),
    (F, 1.0, 0, 6, 5),  # min_scale: no lower than 1
    (F, 1.0, 0, 7, 6),
    (T, 1.0, 1, 7, 0),
    (T, 1.0, 2, 7, 0),
    (T, 2.0, 0, 7, 0),
    (T, 2.0, 1, 7, 0),
    (T, 2.0, 2, 7, 0),
    (T, 4.0, 0, 7, 0),
    (T, 4.0, 1, 7, 0),
    (T, 4.0, 2, 7, 0),
    (T, 8.0, 0, 7, 0),
    (T, 8.0, 1, 7, 0),
    (T, 8.0, 2, 7, 0),
    (T, 16.0, 0, 7, 0),
    (T, 16.0, 1, 7, 0),
    (T, 16.0, 2, 7, 0),
    (T, 32.0, 0, 7, 0),  # reaches max_scale
    (T, 32.0, 1, 7, 0),
    (T, 32.0, 2, 7, 0),
    (T, 32.0, 0, 7, 0),  # would grow to 64: held at max_scale, good_steps still reset
    (T, 32.0, 1, 7, 0),
    (T, 32.0, 2, 7, 0),
    (T, 32.0, 0, 7, 0),
    (F, 16.0, 0, 8, 1),
    (T, 16.0, 1, 8, 0),
    (F, 8.0, 0, 9, 1),  # a non-finite step also discards partial progress towards growth
    (T, 8.0, 1, 9, 0),
    (T, 8.0, 2, 9, 0),
    (T, 16.0, 0, 9, 0),
]


def make_dynamic():
    return DynamicLossScale(
        init_scale=8, growth_interval=3, growth_factor=2, backoff_factor=0.5, min_scale=1, max_scale=32
    )


def check_dtypes(state: LossScaleState):
    assert state.scale.dtype == jnp.float32 and state.scale.shape == ()
    for counter in (state.good_steps, state.skipped_steps, state.consecutive_skips):
        assert counter.dtype == jnp.int32 and counter.shape == ()


def test_dynamic_loss_scale_follows_hand_computed_table():
    ls = make_dynamic()
    state = ls.init()
    check_dtypes(state)
    assert as_tuple(state) == (8.0, 0, 0, 0)
    for i, (finite, *expected) in enumerate(DYNAMIC_SCRIPT):
        state = ls.update(state, flag(finite))
        check_dtypes(state)
        assert as_tuple(state) == tuple(expected), f"step {i + 1} (finite={finite})"


def test_dynamic_loss_scale_stays_within_bounds_on_long_runs():
    ls = make_dynamic()
    state = ls.init()
    for _ in range(100):
        state = ls.update(state, flag(True))
        assert float(state.scale) <= 32.0
    assert float(state.scale) == 32.0
    for _ in range(50):
        state = ls.update(state, flag(False))
        assert float(state.scale) >= 1.0
    assert as_tuple(state) == (1.0, 0, 50, 50)


def test_dynamic_init_above_max_is_kept_and_backs_off():
    ls = DynamicLossScale(init_scale=128.0, growth_interval=2, min_scale=1.0, max_scale=32.0)
    state = ls.init()
    assert float(state.scale) == 128.0  # not clamped at init
    state = ls.update(state, flag(True))
    assert as_tuple(state) == (128.0, 1, 0, 0)  # a finite step without growth leaves it alone
    state = ls.update(state, flag(False))
    assert as_tuple(state) == (64.0, 0, 1, 1)
    state = ls.update(state, flag(False))
    assert as_tuple(state) == (32.0, 0, 2, 2)


def test_growth_interval_one_grows_every_finite_step():
    ls = DynamicLossScale(init_scale=1.0, growth_interval=1, growth_factor=4.0, max_scale=100.0)
    state = ls.init()
    scales = []
    for _ in range(4):
        state = ls.update(state, flag(True))
        scales.append(float(state.scale))
        assert int(state.good_steps) == 0
    assert scales == [4.0, 16.0, 64.0, 100.0]


# Rows: finite flag, then (good_steps, skipped_steps, consecutive_skips) after the step.
COUNTING_SCRIPT = [(T, 0, 0, 0), (F, 0, 1, 1), (F, 0, 2, 2), (T, 0, 2, 0), (T, 0, 2, 0), (F, 0, 3, 1)]


@pytest.mark.parametrize("ls, scale", [(NoOpLossScale(), 1.0), (StaticLossScale(128.0), 128.0)])
def test_noop_and_static_keep_scale_and_count_skips(ls, scale):
    state = ls.init()
    check_dtypes(state)
    assert as_tuple(state) == (scale, 0, 0, 0)
    for i, (finite, good, skipped, consecutive) in enumerate(COUNTING_SCRIPT):
        state = ls.update(state, flag(finite))
        check_dtypes(state)
        assert as_tuple(state) == (scale, good, skipped, consecutive), f"step {i + 1}"


def test_static_default_scale():
    assert float(StaticLossScale().init().scale) == 2.0**15


# ----------------------------------------------------------------------------------------------------
# 3. jit, pytrees and checkpoints


@pytest.mark.parametrize("ls", [make_dynamic(), NoOpLossScale(), StaticLossScale(4.0)], ids=type)
def test_update_under_jit_matches_eager(ls):
    update = jax.jit(ls.update)
    eager = jitted = ls.init()
    for finite, *_ in DYNAMIC_SCRIPT:
        eager = ls.update(eager, flag(finite))
        jitted = update(jitted, flag(finite))
        assert as_tuple(jitted) == as_tuple(eager)
        check_dtypes(jitted)


def test_update_traces_finite_once():
    ls = make_dynamic()
    traces = []

    @jax.jit
    def update(state, finite):
        traces.append(None)
        return ls.update(state, finite)

    state = ls.init()
    for finite in (True, False, True):
        state = update(state, flag(finite))
    assert len(traces) == 1  # finite is a traced bool, not a static argument
    assert as_tuple(state) == (4.0, 1, 1, 0)


def sample_state() -> LossScaleState:
    return LossScaleState(
        scale=jnp.asarray(1024.0, jnp.float32),
        good_steps=jnp.asarray(7, jnp.int32),
        skipped_steps=jnp.asarray(3, jnp.int32),
        consecutive_skips=jnp.asarray(2, jnp.int32),
    )


def test_loss_scale_state_is_a_pytree():
    state = sample_state()
    leaves, treedef = jax.tree.flatten(state)
    assert len(leaves) == 4
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, LossScaleState)
    assert as_tuple(rebuilt) == (1024.0, 7, 3, 2)
    doubled = jax.tree.map(lambda x: x * 2, state)
    assert isinstance(doubled, LossScaleState) and as_tuple(doubled) == (2048.0, 14, 6, 4)


def test_loss_scale_state_through_jit():
    state = sample_state()
    out = jax.jit(lambda s: s)(state)
    assert isinstance(out, LossScaleState)
    assert as_tuple(out) == as_tuple(state)
    check_dtypes(out)
    bumped = jax.jit(lambda s: LossScaleState(s.scale / 2, s.good_steps + 1, s.skipped_steps, s.consecutive_skips))(
        state
    )
    assert as_tuple(bumped) == (512.0, 8, 3, 2)


def test_loss_scale_state_through_orbax_checkpoint(tmp_path):
    state = make_dynamic().init()
    for finite in (True, True, True, False, True):
        state = make_dynamic().update(state, flag(finite))
    tree = {"loss_scale": state}
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    assert isinstance(restored["loss_scale"], LossScaleState)
    assert as_tuple(restored["loss_scale"]) == as_tuple(state) == (8.0, 1, 1, 0)
    for old, new in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
        assert new.dtype == old.dtype and new.shape == old.shape
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


# ----------------------------------------------------------------------------------------------------
# 4. Validation and configuration


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"growth_factor": 0.5}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"min_scale": 64.0, "max_scale": 32.0}, "min_scale"),
        ({"min_scale": 0.0}, "min_scale"),
    ],
)
def test_dynamic_loss_scale_validation(kwargs, field):
    with pytest.raises(ConfigError, match=rf"precision\.{field}"):
        DynamicLossScale(**kwargs)


def test_dynamic_loss_scale_accepts_boundaries():
    DynamicLossScale(growth_interval=1, min_scale=8.0, max_scale=8.0, backoff_factor=0.999, growth_factor=1.001)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"loss_scale": "bogus"}, "loss_scale"),
        ({"loss_scale": "Dynamic"}, "loss_scale"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"policy": "bf32"}, "policy"),
        ({"policy": "p=f32,c=bf16"}, "policy"),
        ({"loss_scale": "dynamic", "growth_interval": 0}, "growth_interval"),
        ({"policy": "fp16", "backoff_factor": 2.0}, "backoff_factor"),  # 'auto' with fp16 is dynamic
    ],
)
def test_precision_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=rf"precision\.{field}"):
        PrecisionConfig(**kwargs)


def test_loss_scale_from_config_auto_fp16_is_dynamic_with_config_numbers():
    numbers = {
        "init_scale": 1024.0,
        "growth_interval": 10,
        "growth_factor": 4.0,
        "backoff_factor": 0.25,
        "min_scale": 2.0,
        "max_scale": 2.0**20,
    }
    for policy in ("fp16", "p=f32,c=f16,o=f32", "p=bf16,c=f16,o=f32"):
        ls = loss_scale_from_config(PrecisionConfig(policy=policy, loss_scale="auto", **numbers))
        assert ls == DynamicLossScale(**numbers)
        assert float(ls.init().scale) == 1024.0


@pytest.mark.parametrize("policy", ["bf16", "fp32", "pure-bf16", "p=bf16,c=f32,o=f16"])
def test_loss_scale_from_config_auto_without_fp16_compute_is_noop(policy):
    assert isinstance(loss_scale_from_config(PrecisionConfig(policy=policy, loss_scale="auto")), NoOpLossScale)


def test_loss_scale_from_config_explicit_kinds():
    static = loss_scale_from_config(PrecisionConfig(policy="bf16", loss_scale="static", init_scale=512.0))
    assert static == StaticLossScale(512.0)
    assert float(static.init().scale) == 512.0
    assert isinstance(loss_scale_from_config(PrecisionConfig(policy="fp16", loss_scale="none")), NoOpLossScale)
    dynamic = loss_scale_from_config(PrecisionConfig(policy="fp32", loss_scale="dynamic", growth_interval=7))
    assert isinstance(dynamic, DynamicLossScale) and dynamic.growth_interval == 7
    assert dynamic.init_scale == 2.0**16 and dynamic.max_scale == 2.0**32


@pytest.mark.parametrize("init_scale", [0.0, -8.0])
def test_static_loss_scale_rejects_non_positive_scale(init_scale):
    with pytest.raises(ConfigError, match=r"precision\.init_scale"):
        PrecisionConfig(loss_scale="static", init_scale=init_scale)


# ----------------------------------------------------------------------------------------------------
# 5. GradientScaler on a toy linear regression


def regression_data():
    rng = np.random.default_rng(0)  # numpy: no per-shape compilation of a jax.random kernel
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = x @ np.array([1.5, -2.0, 0.5], np.float32) + 0.75 + 0.01 * rng.standard_normal(64).astype(np.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = {"w": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return x, y, params


def mse(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for left, right in zip(leaves_a, leaves_b, strict=True):
        assert jnp.asarray(left).dtype == jnp.asarray(right).dtype
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_scale_multiplies_by_scale():
    state = StaticLossScale(256.0).init()
    scaled = GradientScaler.scale(jnp.asarray(1.5, jnp.float16), state)
    assert scaled.dtype == jnp.float32 and float(scaled) == 384.0


def test_unscaled_gradient_of_scaled_loss_equals_plain_gradient():
    x, y, params = regression_data()
    params = {"w": jnp.array([0.3, -0.1, 0.2]), "b": jnp.asarray(0.1)}
    scaler = GradientScaler(DynamicLossScale(init_scale=2.0**12))
    ls = scaler.init()
    plain, scaled = jax.jit(lambda p: (jax.grad(mse)(p, x, y), jax.grad(lambda q: scaler.scale(mse(q, x, y), ls))(p)))(
        params
    )
    np.testing.assert_allclose(scaled["w"], plain["w"] * 2.0**12, rtol=1e-6)
    unscaled = scaler.unscale(scaled, ls)
    for key in plain:
        assert unscaled[key].dtype == plain[key].dtype
        np.testing.assert_allclose(unscaled[key], plain[key], rtol=1e-6)


def test_unscale_keeps_gradient_dtypes():
    grads = {"a": jnp.full((2,), 64.0, jnp.float16), "b": jnp.full((2,), 64.0, jnp.bfloat16)}
    out = GradientScaler.unscale(grads, StaticLossScale(32.0).init())
    assert out["a"].dtype == jnp.float16 and out["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), [2.0, 2.0])
    np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [2.0, 2.0])


def test_step_with_finite_grads_equals_plain_optax():
    x, y, params = regression_data()
    tx = optax.adam(0.1)
    opt_state = tx.init(params)
    grads = jax.grad(mse)(params, x, y)
    new_params, new_opt_state, finite = GradientScaler.step(tx, grads, opt_state, params)
    updates, expected_opt_state = tx.update(grads, opt_state, params)
    expected_params = optax.apply_updates(params, updates)
    assert bool(finite) is True
    assert_trees_equal(new_params, expected_params)
    assert_trees_equal(new_opt_state, expected_opt_state)
    assert not np.array_equal(new_params["w"], params["w"])  # an update really happened


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_step_with_non_finite_grads_changes_nothing(bad, jit):
    x, y, params = regression_data()
    tx = optax.adam(0.1)
    # a non-trivial optimizer state first, so that "unchanged" is not just "still zero"
    opt_state = tx.init(params)
    for _ in range(2):
        params, opt_state, _ = GradientScaler.step(tx, jax.grad(mse)(params, x, y), opt_state, params)
    grads = jax.grad(mse)(params, x, y)
    grads = {"w": grads["w"].at[1].set(bad), "b": grads["b"]}
    step = jax.jit(GradientScaler.step, static_argnums=0) if jit else GradientScaler.step
    new_params, new_opt_state, finite = step(tx, grads, opt_state, params)
    assert bool(finite) is False
    assert_trees_equal(new_params, params)
    assert_trees_equal(new_opt_state, opt_state)


def test_all_finite():
    good = {"a": jnp.ones((3,)), "b": [jnp.zeros((2, 2), jnp.bfloat16), jnp.arange(4)], "c": jnp.float32(1e30)}
    assert bool(all_finite(good)) is True
    assert bool(all_finite({})) is True
    assert bool(all_finite([])) is True
    assert bool(all_finite(None)) is True
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        tree = {"a": jnp.ones((3,)), "b": [jnp.zeros((2, 2), jnp.bfloat16), jnp.ones((4,)).at[2].set(bad)]}
        assert bool(all_finite(tree)) is False
    assert bool(all_finite({"h": jnp.array([70000.0]).astype(jnp.float16)})) is False  # fp16 overflow is inf
    result = jax.jit(all_finite)(good)
    assert result.dtype == jnp.bool_ and result.shape == ()


def test_gradient_scaler_fp16_loop_converges():
    x, y, params = regression_data()
    tx = optax.adam(0.05)
    # 2**20 overflows fp16 on the way back (its max is 65504): the first steps must be skipped and backed off.
    scaler = GradientScaler(DynamicLossScale(init_scale=2.0**20, growth_interval=20, max_scale=2.0**24))
    x16, y16 = x.astype(jnp.float16), y.astype(jnp.float16)

    def loss16(p):
        p16 = jax.tree.map(lambda a: a.astype(jnp.float16), p)
        return jnp.mean((x16 @ p16["w"] + p16["b"] - y16) ** 2)

    @jax.jit
    def train_step(params, opt_state, ls):
        grads = jax.grad(lambda p: scaler.scale(loss16(p), ls))(params)
        grads = scaler.unscale(grads, ls)
        params, opt_state, finite = scaler.step(tx, grads, opt_state, params)
        return params, opt_state, scaler.update(ls, finite), finite

    opt_state, ls = tx.init(params), scaler.init()
    initial = float(mse(params, x, y))
    finites = []
    for _ in range(300):
        params, opt_state, ls, finite = train_step(params, opt_state, ls)
        finites.append(bool(finite))
    assert finites[0] is False  # the oversized initial scale was caught, not applied
    assert int(ls.skipped_steps) == finites.count(False) >= 1
    assert float(ls.scale) < 2.0**20
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert float(mse(params, x, y)) < 1e-2 * initial
    np.testing.assert_allclose(params["w"], [1.5, -2.0, 0.5], atol=0.05)
    np.testing.assert_allclose(params["b"], 0.75, atol=0.05)


@pytest.mark.parametrize("ls", [NoOpLossScale(), make_dynamic()], ids=type)
def test_update_accepts_python_bool(ls):
    state = ls.update(ls.init(), False)
    assert int(state.skipped_steps) == 1 and int(state.consecutive_skips) == 1


# ----------------------------------------------------------------------------------------------------
# 6. autocast


def test_autocast_context_sets_compute_dtype():
    assert compute_dtype(jnp.float32) == F32
    with autocast(jnp.bfloat16) as ctx:
        assert isinstance(ctx, autocast)
        assert compute_dtype(jnp.float32) == BF16
        assert compute_dtype(jnp.float16) == BF16  # autocast wins over the default
    assert compute_dtype(jnp.float32) == F32
    assert compute_dtype("float16") == F16
    with autocast():  # bf16 by default
        assert compute_dtype(jnp.float32) == BF16


def test_autocast_nesting_restores_outer():
    with autocast(jnp.bfloat16):
        with autocast(jnp.float16):
            assert compute_dtype(jnp.float32) == F16
            with autocast(jnp.float32):
                assert compute_dtype(jnp.bfloat16) == F32
            assert compute_dtype(jnp.float32) == F16
        assert compute_dtype(jnp.float32) == BF16
    assert compute_dtype(jnp.float32) == F32


def test_autocast_same_instance_reentrant_and_restored_after_exception():
    cast = autocast(jnp.float16)
    with cast, cast:
        assert compute_dtype(jnp.float32) == F16
    assert compute_dtype(jnp.float32) == F32
    with pytest.raises(RuntimeError), autocast(jnp.bfloat16):
        raise RuntimeError("boom")
    assert compute_dtype(jnp.float32) == F32


def test_autocast_as_decorator():
    @autocast(jnp.float16)
    def inner():
        return compute_dtype(jnp.float32)

    assert inner() == F16
    assert inner() == F16  # the decorator can be used again
    assert compute_dtype(jnp.float32) == F32
    with autocast(jnp.bfloat16):
        assert inner() == F16
        assert compute_dtype(jnp.float32) == BF16


def test_autocast_retraces_a_function_traced_without_it():
    def cast(x):
        return x.astype(compute_dtype(jnp.float32))

    x = jnp.ones((3,), jnp.float32)
    assert jax.jit(cast)(x).dtype == jnp.float32
    with autocast(jnp.bfloat16):
        assert cast(x).dtype == jnp.bfloat16  # eager: fine
        assert jax.jit(cast)(x).dtype == jnp.bfloat16  # a fresh jit of the same function: stale fp32 trace


TINY = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16)


def dot_dtypes(jaxpr_text: str) -> list[str]:
    """The output dtype of every dot_general in a printed jaxpr (nested jaxprs included)."""
    return re.findall(r"(\w+)\[[\d,]*\] = dot_general\[", jaxpr_text)


@pytest.fixture(scope="module")
def tiny_decoder():
    """(graphdef, state) of a tiny llama Decoder. The shapes come from the real constructor (abstractly); the
    values are drawn with numpy, which skips compiling an initializer per parameter shape on CPU (seconds)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def test_decoder_under_autocast_computes_in_bf16(tiny_decoder):
    graphdef, state = tiny_decoder
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)

    def make_forward():
        # A new function object for each trace: JAX's trace cache is keyed on the function, not on autocast
        # (see test_autocast_retraces_a_function_traced_without_it).
        return lambda state, tokens: nnx.merge(graphdef, state)(tokens)

    fp32_dots = dot_dtypes(str(jax.make_jaxpr(make_forward())(state, tokens)))
    with autocast(jnp.bfloat16):
        bf16_dots = dot_dtypes(str(jax.make_jaxpr(make_forward())(state, tokens)))

    @jax.jit
    def both(state, tokens):  # one compilation for both runs: autocast is read while tracing
        fp32 = make_forward()(state, tokens)
        with autocast(jnp.bfloat16):
            return fp32, make_forward()(state, tokens)

    fp32_logits, bf16_logits = both(state, tokens)

    assert fp32_dots and set(fp32_dots) == {"f32"}
    # q, k, v, attention, out projection and the MLP run in bf16; the LM head accumulates in fp32
    assert bf16_dots.count("bf16") >= 6, bf16_dots
    assert len(bf16_dots) == len(fp32_dots)
    assert fp32_logits.dtype == bf16_logits.dtype == jnp.float32  # output dtype of the fp32 policy
    assert bf16_logits.shape == fp32_logits.shape == (2, 16, TINY.vocab_size)
    diff = float(jnp.max(jnp.abs(bf16_logits - fp32_logits)))
    scale = float(jnp.max(jnp.abs(fp32_logits)))
    assert diff > 0.0  # bf16 really was used
    assert diff < 0.05 * scale, (diff, scale)  # ... and stayed close
    assert compute_dtype(jnp.float32) == F32


def test_decoder_policy_sets_compute_dtype_without_autocast():
    model = nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0), policy=parse_policy("bf16")))
    graphdef, state = nnx.split(model)  # abstract: make_jaxpr needs only shapes
    tokens = jnp.zeros((1, 8), jnp.int32)
    text = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    assert "bf16" in dot_dtypes(text)
    with autocast(jnp.float32):  # autocast overrides the policy's compute dtype
        text = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    assert set(dot_dtypes(text)) == {"f32"}


# ----------------------------------------------------------------------------------------------------
# 7. CheckpointModule


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(4, 16, rngs=rngs)
        self.down = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


MODULES = {
    "linear": lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
    "mlp": lambda: MLP(nnx.Rngs(0)),
}
POLICY_NAMES = ["full", "dots", "minimal", "none"]


def loss_and_grads(module, x):
    """(output, d loss / d params leaves, d loss / d x) for loss = sum(sin(module(x)))."""
    graphdef, state = nnx.split(module)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x), jax.grad(loss, argnums=(0, 1))(state, x)

    out, (g_state, g_x) = run(state, x)
    return out, jax.tree.leaves(g_state), g_x


def remat_primitives(module, x) -> list[str]:
    graphdef, state = nnx.split(module)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    text = str(jax.make_jaxpr(jax.grad(loss))(state, x))
    return re.findall(r"= (remat\w*|checkpoint)\[", text)


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("kind", list(MODULES))
def test_checkpoint_module_matches_plain_module(kind, policy):
    x = jax.random.normal(jax.random.key(2), (5, 4))
    plain = MODULES[kind]()
    wrapped = CheckpointModule(MODULES[kind](), policy=policy)
    out_p, grads_p, gx_p = loss_and_grads(plain, x)
    out_w, grads_w, gx_w = loss_and_grads(wrapped, x)
    np.testing.assert_allclose(out_w, out_p, rtol=1e-6)
    assert len(grads_w) == len(grads_p) == (2 if kind == "linear" else 4)
    for gw, gp in zip(grads_w, grads_p, strict=True):
        assert gw.shape == gp.shape
        assert float(jnp.max(jnp.abs(gp))) > 0
        np.testing.assert_allclose(gw, gp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gx_w, gx_p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", list(MODULES))
def test_checkpoint_module_jaxpr_has_remat_only_when_asked(kind):
    x = jnp.ones((2, 4))
    assert remat_primitives(CheckpointModule(MODULES[kind](), policy="full"), x)
    assert remat_primitives(CheckpointModule(MODULES[kind](), policy="dots"), x)
    assert not remat_primitives(CheckpointModule(MODULES[kind](), policy="none"), x)
    assert not remat_primitives(MODULES[kind](), x)


def test_checkpoint_module_eager_call_forwards():
    linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_allclose(CheckpointModule(linear)(x), linear(x), rtol=1e-6)
    assert CheckpointModule(linear).policy == "full"


@pytest.mark.parametrize("policy", ["bogus", "FULL", ""])
def test_checkpoint_module_rejects_unknown_policy(policy):
    with pytest.raises(ConfigError, match="policy"):
        CheckpointModule(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), policy=policy)
