"""The residual add + norm kernels (dsjax.models.norms): the Pallas kernels (run by Pallas's interpreter on
CPUs, compiled on GPUs) and the XLA implementation compute the same sum, normalised rows and gradients, for LayerNorm
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
from training import AUTO_KERNEL, assert_decoder_settings_agree, needs_devices, needs_triton

from dsjax.config import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    PrecisionConfig,
    RematConfig,
    TrainConfig,
)
from dsjax.mesh import make_mesh
from dsjax.models import norms
from dsjax.sharding import named
from dsjax.step import loss_fn
from dsjax.train import batch_at, build

pytestmark = needs_triton


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


def value_and_grads(impl, inputs, weights, mesh=None):
    ws, wh = weights

    def loss(x, y, b, scale, bias):
        s, h = norms.add_norm(x, y, scale, bias, 1e-5, y_bias=b, impl=impl, mesh=mesh)
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
@pytest.mark.parametrize("shape", [(3, 37, 96), (3, 32, 128)], ids=["partial_blocks", "uneven_programs"])
def test_kernels_equal_xla_in_fp32(form, shape, monkeypatch):
    # two backward programs, so each loops over row blocks (128 wide: 32 rows a block): 4 blocks, the
    # last partial, for (3, 37, 96); 3 blocks, two for one program and one for the other, for (3, 32, 128)
    monkeypatch.setattr(norms, "BWD_PROGRAMS", 2)
    inputs, weights = case(shape, *form)
    assert_close(value_and_grads("pallas", inputs, weights), value_and_grads("xla", inputs, weights), 1e-5)


def test_bf16_kernels_within_one_rounding():
    inputs, weights = case((2, 24, 96), True, True, True, jnp.bfloat16, seed=1)
    got, want = value_and_grads("pallas", inputs, weights), value_and_grads("xla", inputs, weights)
    assert [a.dtype for a in got[1:6]] == [jnp.bfloat16] * 5  # s, h, dx, dy, db
    np.testing.assert_array_equal(got[1], want[1])  # the sum, rounded after the bias add and the residual add
    assert_close(got[2:5], want[2:5], 2**-7)  # h, dx, dy
    assert_close(got[5:], want[5:], 2**-5)  # db, dscale, dbias: sums over 48 rows


@needs_devices(8)
@pytest.mark.parametrize("degrees", [dict(data=2, fsdp=2, tensor=2), dict(data=2, pipeline=2, fsdp=2)])
def test_kernels_run_on_each_devices_rows(degrees):
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **degrees})
    inputs, weights = case((8, 6, 96), True, True, True, seed=2)
    sharding = named(("act_batch", "act_seq", "act_embed"), inputs[0].shape, mesh)
    assert sharding.spec[0] is not None
    inputs = (jax.device_put(inputs[0], sharding), jax.device_put(inputs[1], sharding), *inputs[2:])
    got = value_and_grads("pallas", inputs, weights, mesh)
    assert got[1].sharding.is_equivalent_to(sharding, 3)
    assert_close(got, value_and_grads("xla", inputs, weights, mesh), 1e-5)


def test_auto_takes_the_kernels_for_layernorm_on_gpus(monkeypatch):
    assert norms.resolve("auto", 768) == AUTO_KERNEL  # this backend's devices
    monkeypatch.setattr(norms, "sharding_platform", lambda sharding: "gpu")
    assert norms.resolve("auto", 768) == "pallas"
    assert norms.resolve("auto", 2048, rms=True) == "xla"  # RMSNorm: XLA measured as fast, with less memory
    assert norms.resolve("auto", 16384) == "xla"
    with pytest.raises(ConfigError, match=r"model.norm_kernel='pallas'.*d_model <= 8192 \(got 16384\)"):
        norms.resolve("pallas", 16384)
    with pytest.raises(ConfigError, match=r"model\.norm_kernel must be one of"):
        ModelConfig(norm_kernel="triton")


@needs_devices(8)
def test_features_split_over_devices_keep_xla(monkeypatch):
    monkeypatch.setattr(norms, "sharding_platform", lambda sharding: "gpu")
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 2, "tensor": 4})
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, "tensor"))
    assert norms.resolve("auto", 64, split) == "xla"
    with pytest.raises(ConfigError, match=r"feature axis unsplit.*'tensor'"):
        norms.resolve("pallas", 64, split)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_loss_and_gradients_equal_for_both_implementations(family):
    assert_decoder_settings_agree(family, "norm_kernel", ("xla", "pallas"), n_layers=2, d_model=24)


@needs_devices(8)
def test_sharded_bf16_decoder_with_remat_equal_for_both_implementations(no_compilation_cache):
    """What `auto` runs on GPUs: bf16 compute, remat dots_attention (the kernels' forward pass runs again in
    the backward pass, inside jax.checkpoint), on a mesh (per device under shard_map). Loss relative 1e-3,
    gradients relative L2 error 1e-2 (bf16 activations, reduced in another order)."""
    results = []
    for impl in ("xla", "pallas"):
        cfg = Config(
            model=ModelConfig(
                family="gpt2", n_layers=2, d_model=48, n_heads=2, n_kv_heads=2, d_ff=96, max_seq_len=32,
                tie_embeddings=True, norm_kernel=impl,
            ),
            mesh=MeshConfig(data=2, fsdp=2, tensor=2),
            data=DataConfig(source="default"),
            train=TrainConfig(steps=1, batch_size=8, seq_len=16),
            precision=PrecisionConfig(policy="bf16"),
            remat=RematConfig(policy="dots_attention"),
        )  # fmt: skip
        run = build(cfg, devices=jax.devices()[:8])
        grad = jax.jit(jax.value_and_grad(lambda p, b, r=run: loss_fn(r.graphdef, p, b, r.mesh)))
        loss, grads = grad(run.state.params, batch_at(run, run.train_samples, 0))
        results.append((float(loss), jax.device_get(nnx.to_pure_dict(grads))))
    (xla_loss, xla_grads), (pallas_loss, pallas_grads) = results
    np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-3)
    got = dict(jax.tree_util.tree_leaves_with_path(pallas_grads))
    for path, want in jax.tree_util.tree_leaves_with_path(xla_grads):
        if jax.tree_util.keystr(path) == "['blocks']['bk']":  # zero in exact arithmetic (softmax ignores it)
            assert np.abs(got[path]).max() < 1e-5 and np.abs(want).max() < 1e-5
        else:
            error = np.linalg.norm(got[path] - want) / np.linalg.norm(want)
            assert error <= 1e-2, f"{jax.tree_util.keystr(path)}: relative L2 error {error:.3g}"
