"""gpt2's q/k/v bias add and split (dsjax.models.qkv): the Pallas backward kernel (run by Pallas's interpreter on
CPUs, compiled on GPUs) and autodiff give the same q, k, v and the same gradients of qkv and of the bias, on one device,
on a sharded mesh and through the whole decoder; `auto` picks the kernel on GPUs.

Tolerances: the qkv gradient is a copy of the cotangents, so it is compared exactly; the bias gradient is a
sum over rows in another order: fp32 relative 1e-5 (absolute 1e-5 near zero); in bf16 the kernel's (summed in
fp32) is one bf16 rounding from the fp64 sum, and no further from it than autodiff's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training import AUTO_KERNEL, assert_decoder_settings_agree, needs_devices, needs_triton

from dsjax.config import ConfigError, ModelConfig
from dsjax.mesh import make_mesh
from dsjax.models import qkv as qkv_mod
from dsjax.sharding import named

pytestmark = needs_triton


def inputs(dtype, B=2, T=13, N=3, H=40):  # rows and columns that are not multiples of the kernel's tiles
    ks = jax.random.split(jax.random.key(0), 3)
    qkv = jax.random.normal(ks[0], (B, T, 3, N, H)).astype(dtype)
    b = jax.random.normal(ks[1], (3, N, H)).astype(dtype)
    w = jax.random.normal(ks[2], (3, B, T, N, H)).astype(dtype)
    return qkv, b, w


def value_and_grads(impl, qkv, b, w, mesh=None):
    def loss(qkv, b):
        outs = qkv_mod.split_qkv(qkv, b, impl=impl, mesh=mesh)
        return sum((o.astype(jnp.float32) * w[i].astype(jnp.float32)).sum() for i, o in enumerate(outs)), outs

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(qkv, b)
    return outs, grads


@pytest.mark.parametrize(
    "shape", [dict(), dict(B=1, T=2100, N=2, H=300)], ids=["partial-tiles", "looping-three-column-blocks"]
)
def test_the_kernel_equals_autodiff_in_fp32(shape):
    if shape:
        assert math.ceil(2100 / qkv_mod.BLOCK_ROWS) > qkv_mod.ROW_PROGRAMS and 2 * qkv_mod.BLOCK_COLS < 600
    qkv, b, w = inputs(jnp.float32, **shape)
    (outs, (dqkv, db)), (want_outs, (want_dqkv, want_db)) = (
        value_and_grads(impl, qkv, b, w) for impl in ("pallas", "xla")
    )
    for got, want in zip(outs, want_outs, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dqkv, want_dqkv)
    np.testing.assert_array_equal(dqkv, jnp.stack(list(w), axis=2))  # the cotangents, in their places
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)


def test_the_kernel_keeps_bf16():
    qkv, b, w = inputs(jnp.bfloat16)
    (_, (dqkv, db)), (_, (want_dqkv, want_db)) = (value_and_grads(impl, qkv, b, w) for impl in ("pallas", "xla"))
    assert dqkv.dtype == db.dtype == jnp.bfloat16
    np.testing.assert_array_equal(dqkv.astype(jnp.float32), want_dqkv.astype(jnp.float32))
    exact = np.asarray(w, np.float64).sum(axis=(1, 2))  # (3, N, H): the bias gradient in fp64
    # one bf16 rounding of the exact sum; autodiff's bf16 sums were up to 0.12 off at about 10 on this case
    np.testing.assert_allclose(db.astype(jnp.float32), exact, rtol=2**-8)
    assert np.abs(db.astype(jnp.float32) - exact).max() <= np.abs(want_db.astype(jnp.float32) - exact).max()


@needs_devices(8)
@pytest.mark.parametrize("degrees", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)])
def test_the_kernel_runs_on_each_devices_rows_and_heads(degrees):
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **degrees})
    qkv, b, w = inputs(jnp.float32, B=4, T=8, N=4, H=24)
    sharding = named(qkv_mod.HEADS, (4, 8, 4, 24), mesh)
    assert sharding.spec[2] is not None  # the heads are split too
    (outs, (dqkv, db)), (want_outs, (want_dqkv, want_db)) = (
        value_and_grads(impl, qkv, b, w, mesh) for impl in ("pallas", "xla")
    )
    for got, want in zip(outs, want_outs, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dqkv, want_dqkv)
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)


def test_decoder_loss_and_gradients_equal_for_both_kernels():
    assert_decoder_settings_agree("gpt2", "qkv_kernel", ("xla", "pallas"))


def test_auto_takes_the_kernel_on_gpus(monkeypatch):
    assert qkv_mod.resolve("auto") == AUTO_KERNEL  # this backend's devices
    monkeypatch.setattr(qkv_mod, "sharding_platform", lambda sharding: "gpu")
    assert qkv_mod.resolve("auto") == "pallas"
    for check in (lambda: ModelConfig(qkv_kernel="triton"), lambda: qkv_mod.resolve("triton")):
        with pytest.raises(ConfigError, match=r"model\.qkv_kernel must be one of \('auto', 'xla', 'pallas'\)"):
            check()
