"""The residual add + norm kernels (dsjax.models.norms): the Pallas kernels (run by Pallas's interpreter on
these CPUs) and the XLA implementation compute the same sum, normalised rows and gradients, for LayerNorm
and RMSNorm, with and without the residual input and its bias, on one device and on a sharded mesh, and
through the whole decoder.

Tolerances: fp32 relative 1e-5 of each output's largest value (the kernels sum in another order); bf16
one bf16 spacing at the largest value (2^-7 of it), the parameter gradients, sums over rows, 2^-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import ConfigError, ModelConfig
from dsjax.mesh import make_mesh
from dsjax.models import Decoder, norms
from dsjax.sharding import named
from dsjax.step import loss_fn


def case(shape, layer: bool, with_y: bool, with_b: bool, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    D = shape[-1]
    x = (3 * jax.random.normal(ks[0], shape) + 1).astype(dtype)  # an offset: the mean matters
    y = jax.random.normal(ks[1], shape).astype(dtype) if with_y else None
    b = (0.5 * jax.random.normal(ks[2], (D,))).astype(dtype) if with_b else None
    scale = 1 + 0.2 * jax.random.normal(ks[3], (D,))
    bias = 0.2 * jax.random.normal(ks[4], (D,)) if layer else None
    ws, wh = jax.random.normal(ks[5], shape), jax.random.normal(ks[6], shape)
    return (x, y, b, scale, bias), (ws, wh)


def value_and_grads(impl, inputs, weights, sharding=None):
    ws, wh = weights

    def loss(x, y, b, scale, bias):
        s, h = norms.add_norm(x, y, scale, bias, 1e-5, y_bias=b, impl=impl, sharding=sharding)
        return (s.astype(jnp.float32) * ws).sum() + (h.astype(jnp.float32) * wh).sum(), (s, h)

    (value, (s, h)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*inputs)
    return [value, s, h, *(g for g in grads if g is not None)]


def assert_close(got, want, rtol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max(), err_msg=f"output {i}")


FORMS = [  # (LayerNorm, residual input, its bias)
    (True, True, True),  # GPT-2 after attention: x + (out + bo), LayerNorm
    (True, False, False),  # GPT-2's first and final norm
    (False, True, False),  # llama after attention: x + out, RMSNorm
    (False, False, False),
]


@pytest.mark.parametrize("form", FORMS, ids=["add_bias_layer", "layer", "add_rms", "rms"])
@pytest.mark.parametrize("shape", [(3, 37, 96), (2, 8, 128)], ids=["partial_blocks", "whole_blocks"])
def test_kernels_equal_xla_in_fp32(form, shape, monkeypatch):
    # two backward programs, so each loops over several row blocks (96 -> 128 wide: 32 rows a block)
    monkeypatch.setattr(norms, "BWD_PROGRAMS", 2)
    inputs, weights = case(shape, *form)
    assert_close(value_and_grads("pallas", inputs, weights), value_and_grads("xla", inputs, weights), 1e-5)


def test_bf16_kernels_within_one_rounding():
    inputs, weights = case((2, 24, 96), True, True, True, jnp.bfloat16, seed=1)
    got, want = value_and_grads("pallas", inputs, weights), value_and_grads("xla", inputs, weights)
    assert [a.dtype for a in got[1:4]] == [jnp.bfloat16] * 3
    assert_close(got[1:5], want[1:5], 2**-7)  # s, h, dx, dy
    assert_close(got[5:], want[5:], 2**-5)  # db, dscale, dbias: sums over 48 rows


@pytest.mark.parametrize("degrees", [dict(data=2, fsdp=2, tensor=2), dict(data=2, pipeline=2, fsdp=2)])
def test_kernels_run_on_each_devices_rows(degrees):
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **degrees})
    inputs, weights = case((8, 6, 96), True, True, True, seed=2)
    sharding = named(("act_batch", "act_seq", "act_embed"), inputs[0].shape, mesh)
    assert sharding.spec[0] is not None
    inputs = (jax.device_put(inputs[0], sharding), jax.device_put(inputs[1], sharding), *inputs[2:])
    got = value_and_grads("pallas", inputs, weights, sharding)
    assert got[1].sharding.is_equivalent_to(sharding, 3)
    assert_close(got, value_and_grads("xla", inputs, weights, sharding), 1e-5)


def test_auto_takes_the_kernels_for_layernorm_on_gpus(monkeypatch):
    assert norms.resolve("auto", 768) == "xla"  # these CPUs
    monkeypatch.setattr(norms, "_platform", lambda sharding: "gpu")
    assert norms.resolve("auto", 768) == "pallas"
    assert norms.resolve("auto", 2048, rms=True) == "xla"  # RMSNorm: XLA measured as fast, with less memory
    assert norms.resolve("auto", 16384) == "xla"
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 2, "tensor": 4})
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, "tensor"))
    assert norms.resolve("auto", 64, split) == "xla"
    with pytest.raises(ConfigError, match=r"model.norm_kernel='pallas'.*d_model <= 8192 \(got 16384\)"):
        norms.resolve("pallas", 16384)
    with pytest.raises(ConfigError, match=r"feature axis unsplit.*'tensor'"):
        norms.resolve("pallas", 64, split)
    with pytest.raises(ConfigError, match=r"model\.norm_kernel must be one of"):
        ModelConfig(norm_kernel="triton")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_loss_and_gradients_equal_for_both_implementations(family):
    batch = jax.random.randint(jax.random.key(3), (4, 17), 0, 256)
    results = []
    for impl in ("xla", "pallas"):
        cfg = ModelConfig(
            family=family, n_layers=2, d_model=24, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16,
            tie_embeddings=family == "gpt2", norm_kernel=impl,
        )  # fmt: skip
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        results.append(jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss_fn(g, p, batch, None)))(params))
    (xla_loss, xla_grads), (pallas_loss, pallas_grads) = results
    np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(pallas_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
