"""The LM head's loss kernels (dsjax.models.xent): the Pallas kernel (run by Pallas's interpreter on these
CPUs), the XLA implementation and a float64 reference compute the same loss and logits gradient, on one
device and on a sharded mesh, and through the whole decoder.

Tolerances: the loss relative 1e-5 against float64 (fp32 sums over up to 2500 logits); the fp32 gradient
absolute 1e-5 (values in [-1, 1]; logits near 60, whose fp32 spacing is 4e-6, set the resolution of
softmax's exponent); bf16 gradients one bf16 rounding (2^-8 absolute) apart; the decoder's
loss relative 1e-6 and gradients 1e-5 between kernels (fp32 sums in a different order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training import assert_decoder_settings_agree

from dsjax.config import ConfigError, ModelConfig
from dsjax.mesh import make_mesh
from dsjax.models import Decoder, xent
from dsjax.sharding import named
from dsjax.step import loss_fn


def random_case(rows: tuple[int, ...], vocab: int, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 6 * jax.random.normal(k1, (*rows, vocab), jnp.float32) + 40.0  # a shift: the running max matters
    labels = jax.random.randint(k2, rows, 0, vocab).at[..., 0].set(0).at[..., -1].set(vocab - 1)  # both ends
    return logits, labels


def reference(logits, labels):
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    onehot = np.arange(x.shape[-1]) == np.asarray(labels)[..., None]
    loss = lse - np.take_along_axis(x, np.asarray(labels)[..., None], -1)[..., 0]
    return loss, np.exp(x - lse[..., None]) - onehot


@pytest.mark.parametrize("vocab", [200, 2048, 2500])  # under one block, exactly one, and a partial last block
@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_loss_and_gradient_match_float64(kernel, vocab):
    logits, labels = random_case((2, 3), vocab)
    loss, grad = jax.jit(lambda a, b: xent.loss_and_unit_grad(a, b, jnp.float32, kernel))(logits, labels)
    want_loss, want_grad = reference(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)
    np.testing.assert_allclose(xent.loss_only(logits, labels), want_loss, rtol=1e-5)


def test_the_kernel_writes_the_compute_dtype():
    logits, labels = random_case((4,), 300, seed=1)
    got = [xent.loss_and_unit_grad(logits, labels, jnp.bfloat16, k)[1] for k in ("pallas", "xla")]
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_allclose(got[0].astype(jnp.float32), got[1].astype(jnp.float32), atol=2**-8)


@pytest.mark.parametrize("degrees", [dict(data=2, fsdp=4), dict(data=2, pipeline=2, fsdp=2)])
def test_the_kernel_runs_on_each_devices_rows(degrees):
    mesh = make_mesh({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **degrees})
    logits, labels = random_case((8, 4), 300, seed=2)
    sharding = named(("act_batch", "act_seq", "act_vocab"), logits.shape, mesh)
    assert sharding.spec[0] is not None and xent.resolve("pallas", sharding) == "pallas"
    logits = jax.device_put(logits, sharding)

    @jax.jit
    def both(logits, labels):
        return [xent.loss_and_unit_grad(logits, labels, jnp.float32, k, sharding) for k in ("pallas", "xla")]

    (loss, grad), (want_loss, want_grad) = both(logits, labels)
    assert grad.sharding.is_equivalent_to(sharding, 3)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_auto_takes_the_kernel_on_gpus_unless_the_vocabulary_is_split(monkeypatch):
    assert xent.resolve("auto") == "xla"  # these CPUs
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")
    mesh = make_mesh({"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2})
    split = named(("act_batch", "act_seq", "act_vocab"), (8, 4, 64), mesh)
    whole = named(("act_batch", "act_seq", None), (8, 4, 64), mesh)
    assert (xent.resolve("auto"), xent.resolve("auto", whole), xent.resolve("auto", split)) == ("pallas",) * 2 + (
        "xla",
    )
    with pytest.raises(ConfigError, match=r"model.loss_kernel='pallas' needs whole vocabulary rows.*'tensor'"):
        xent.resolve("pallas", split)
    with pytest.raises(ConfigError, match=r"model\.loss_kernel must be one of"):
        ModelConfig(loss_kernel="triton")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_loss_and_gradients_equal_for_both_kernels(family):
    assert_decoder_settings_agree(family, "loss_kernel", ("xla", "pallas"))


def test_the_chunked_loss_keeps_xla_under_auto(monkeypatch):
    """With train.loss_chunk the forward pass is recomputed under checkpoint: 'auto' takes XLA's
    implementation there (its forward skips the gradient), the kernel elsewhere."""
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")  # trace as on GPUs: no lowering happens
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = jnp.zeros((2, 17), jnp.int32)
    for chunk, kernels in ((0, 1), (8, 0)):
        grad = jax.grad(lambda p, c=chunk: loss_fn(graphdef, p, batch, None, chunk=c))
        assert str(jax.make_jaxpr(grad)(params)).count("pallas_call") == kernels, chunk
