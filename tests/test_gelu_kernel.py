"""GPT-2's bias + GELU (dsjax.models.gelu): the Pallas kernels (run by Pallas's interpreter on CPUs,
with an exact tanh where GPUs use their tanh instruction; compiled on GPUs) and the XLA implementation compute the same
output and gradients, on one device, on a sharded mesh and through the whole decoder; `auto` picks them as
documented.

Tolerances: fp32 relative 1e-5 (the bias gradient is a sum over rows in another order); bf16 against the
fp64 GELU of the same inputs, relative L2 2^-8 (one bf16 rounding of each result).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training import AUTO_KERNEL, assert_decoder_settings_agree, needs_devices, needs_triton

from dsjax.config import ConfigError, ModelConfig
from dsjax.mesh import make_mesh
from dsjax.models import gelu
from dsjax.sharding import named

SHAPE = (2, 37, 600)  # rows and features that are not multiples of the kernels' tiles

pytestmark = needs_triton


def inputs(dtype, shape=SHAPE):
    ks = jax.random.split(jax.random.key(0), 3)
    u = (3 * jax.random.normal(ks[0], shape)).astype(dtype)
    b = jax.random.normal(ks[1], shape[-1:]).astype(dtype)
    w = jax.random.normal(ks[2], shape).astype(dtype)
    return u, b, w


def value_and_grads(impl, u, b, w, mesh=None):
    def loss(u, b):
        out = gelu.bias_gelu(u, b, impl=impl, mesh=mesh)
        return (out.astype(jnp.float32) * w.astype(jnp.float32)).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(u, b)
    return out, *grads


def fp64(u, b, w):
    """The output, u's and b's gradients in fp64 from the rounded sum z = u + b (as both round it)."""
    z = np.asarray((u + b).astype(u.dtype), np.float64)
    c, a = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(c * (z + a * z**3))
    dz = np.asarray(w, np.float64) * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * a * z * z))
    return 0.5 * z * (1 + t), dz, dz.reshape(-1, dz.shape[-1]).sum(0)


@pytest.mark.skipif(
    jax.default_backend() == "gpu",
    reason="on GPUs the kernels use the GPU's approximate tanh (fp32 runs take XLA's exact one under 'auto'); "
    "this holds the kernels' arithmetic to XLA's with the exact tanh of Pallas's interpreter",
)
@pytest.mark.parametrize("shape", [SHAPE, (1, 2100, 20)], ids=["partial-tiles", "looping-backward"])
def test_the_kernels_equal_xla_in_fp32(shape):
    """Partial row and column tiles; more row tiles than backward programs (each program loops)."""
    if shape[1] == 2100:
        assert math.ceil(2100 / gelu.BLOCK_ROWS) > gelu.BWD_ROW_PROGRAMS
    u, b, w = inputs(jnp.float32, shape)
    got, want = value_and_grads("pallas", u, b, w), value_and_grads("xla", u, b, w)
    for a, c in zip(got, want, strict=True):
        assert a.dtype == c.dtype == jnp.float32
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(jnp.abs(c).max()))


def test_the_kernels_in_bf16_round_the_exact_gelu_once():
    u, b, w = inputs(jnp.bfloat16)
    got = value_and_grads("pallas", u, b, w)
    assert [a.dtype for a in got] == [jnp.bfloat16] * 3
    for a, want in zip(got, fp64(u, b, w), strict=True):
        error = np.linalg.norm(np.asarray(a, np.float64) - want) / np.linalg.norm(want)
        assert error < 2**-8, error


@needs_devices(8)
def test_on_a_mesh_the_kernels_run_per_device_and_sum_the_bias_gradient():
    """Rows split over data and fsdp, features over tensor (the layout of ('act_batch', 'act_seq',
    'act_mlp')): b's gradient is each device's column sums, summed over the row axes."""
    mesh = make_mesh({"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2})
    u, b, w = inputs(jnp.float32, (8, 6, 40))
    sharding = named(("act_batch", "act_seq", "act_mlp"), u.shape, mesh)
    assert sharding.spec[2] is not None and sharding.spec[0] is not None  # both splits are exercised
    u, w = jax.device_put(u, sharding), jax.device_put(w, sharding)
    got, want = value_and_grads("pallas", u, b, w, mesh), value_and_grads("xla", u, b, w)
    for a, c in zip(got, want, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(jnp.abs(c).max()))


def test_gpt2_loss_and_gradients_equal_for_both_implementations():
    assert_decoder_settings_agree("gpt2", "gelu_kernel", ("xla", "pallas"), n_layers=1, d_model=24)


def test_auto_takes_the_kernels_for_16_bit_activations_on_gpus(monkeypatch):
    assert gelu.resolve("auto", jnp.bfloat16) == AUTO_KERNEL  # this backend's devices
    monkeypatch.setattr(gelu, "sharding_platform", lambda sharding: "gpu")
    assert gelu.resolve("auto", jnp.bfloat16) == "pallas"
    assert gelu.resolve("auto", jnp.float16) == "pallas"
    assert gelu.resolve("auto", jnp.float32) == "xla"  # fp32 keeps the exact tanh
    assert gelu.resolve("pallas", jnp.float32) == "pallas"
    with pytest.raises(ConfigError, match=r"model\.gelu_kernel must be one of"):
        ModelConfig(gelu_kernel="triton")
    with pytest.raises(ConfigError, match=r"model\.gelu_kernel must be one of"):
        gelu.resolve("cuda", jnp.bfloat16)
