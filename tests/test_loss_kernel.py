"""The LM head's loss kernels (dsjax.models.xent): the Pallas (Triton) kernel (run by Pallas's interpreter on
CPUs, compiled on GPUs), the Mosaic GPU kernel (on Hopper GPUs, or in Mosaic GPU's interpreter where jax has
it: 0.11 and newer; on older jax only its lowering for GPUs is checked here), the XLA implementation and a
float64 reference compute the same loss and logits gradient, on one device and on a sharded mesh, and through the
whole decoder.

Tolerances: the loss relative 1e-5 against float64 (fp32 sums over up to 2500 logits); the fp32 gradient
absolute 1e-5 (values in [-1, 1]; logits near 60, whose fp32 spacing is 4e-6, set the resolution of
softmax's exponent); bf16 gradients one bf16 rounding (2^-8 absolute) apart; the decoder's
loss relative 1e-6 and gradients 1e-5 between kernels (fp32 sums in a different order). The Mosaic kernel
is held to the same bounds in fp32; with 16-bit logits it computes exp(x - m) as 2^(x log2 e - m log2 e) with
the GPU's approximate exp2 and log: its loss is held to relative 1e-5 and its gradient to 2^-8 absolute
against XLA's (one bf16 rounding, and eight fp16 roundings, of values in [-1, 1]).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training import AUTO_KERNEL, assert_decoder_settings_agree, needs_devices, needs_triton

from dsjax.config import ConfigError, ModelConfig
from dsjax.mesh import make_mesh
from dsjax.models import Decoder, xent
from dsjax.sharding import named
from dsjax.step import loss_fn


def mosaic_runs() -> bool:
    if jax.default_backend() == "gpu":
        return xent.hopper_or_newer()
    return xent.mosaic_interpretable()


needs_mosaic = pytest.mark.skipif(
    not mosaic_runs(), reason="the Mosaic kernel runs on Hopper GPUs, or in Mosaic GPU's interpreter (jax >= 0.11)"
)


def mosaic_interpret():
    if jax.default_backend() == "gpu":
        return None
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams()


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
@pytest.mark.parametrize("kernel", ["xla", pytest.param("pallas", marks=needs_triton)])
def test_loss_and_gradient_match_float64(kernel, vocab):
    logits, labels = random_case((2, 3), vocab)
    loss, grad = jax.jit(lambda a, b: xent.loss_and_unit_grad(a, b, jnp.float32, kernel))(logits, labels)
    want_loss, want_grad = reference(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)
    np.testing.assert_allclose(xent.loss_only(logits, labels), want_loss, rtol=1e-5)


@needs_mosaic
@pytest.mark.parametrize(
    "vocab, chunk",
    # one chunk smaller than a full register chunk; one whole chunk; a loop of two and a tail of 256 + 128; one
    # chunk of 2048 and a tail of 1024 + 128 (a vocabulary whose chunk the kernel must round down)
    [(256, 8192), (2048, 8192), (2432, 1024), (3200, 8192)],
)
def test_the_mosaic_kernel_matches_float64(vocab, chunk):
    logits, labels = random_case((2, 3), vocab)
    run = jax.jit(lambda a, b: xent._mosaic_rows(a, b, mosaic_interpret(), chunk=chunk))
    loss, grad = run(logits.reshape(-1, vocab), labels.reshape(-1))
    want_loss, want_grad = reference(logits.reshape(-1, vocab), labels.reshape(-1))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)


@pytest.mark.parametrize("vec", [4, 8])
def test_the_mosaic_kernel_walks_every_row_in_whole_pieces(vec):
    """For every vocabulary the kernel takes (multiples of 128 up to gpt2's), its plan covers the row exactly
    once in pieces whose sizes its register layouts accept (multiples of 128 times the elements per load)."""
    for V in range(128, 50304 + 1, 128):
        for chunk in (1024, 8192):
            size, size_vec, n, tail = xent._mosaic_plan(V, vec, chunk)
            covered = [(i * size, size, size_vec) for i in range(n)] + tail
            assert [start for start, _, _ in covered] == list(
                itertools.accumulate([0] + [s for _, s, _ in covered[:-1]])
            )
            assert sum(s for _, s, _ in covered) == V and size <= chunk, (V, chunk)
            assert all(v >= 1 and s % (128 * v) == 0 and v <= vec for _, s, v in covered), (V, chunk, covered)


@needs_mosaic
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_the_mosaic_kernel_writes_16_bit_gradients(dtype):
    logits, labels = random_case((2, 3), 2432, seed=1)
    logits = (logits - 40.0).astype(dtype)
    loss, grad = jax.jit(lambda a, b: xent.loss_and_unit_grad(a, b, dtype, "mosaic"))(logits, labels)
    want_loss, want_grad = xent._xla(logits, labels, dtype)
    assert grad.dtype == dtype
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad.astype(jnp.float32), want_grad.astype(jnp.float32), atol=2**-8)


def test_the_mosaic_kernel_lowers_for_gpus():
    """On every supported jax, also where it cannot run here: the kernel lowers to one Mosaic GPU call."""
    logits, labels = jnp.zeros((4, 50304), jnp.bfloat16), jnp.zeros((4,), jnp.int32)
    text = jax.jit(xent._mosaic_rows).trace(logits, labels).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and text.count("custom_call") == 1


@needs_triton
def test_auto_takes_the_mosaic_kernel_where_the_row_fits(monkeypatch):
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")
    monkeypatch.setattr(xent, "hopper_or_newer", lambda sharding=None: True)
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert xent.resolve("auto", None, 50304, bf16, bf16) == "mosaic"  # gpt2-124m
    assert xent.resolve("auto", None, 50304, f32, f32) == "mosaic"  # 196.5 KiB rows
    assert xent.resolve("auto", None, 128256, f32, f32) == "pallas"  # llama-1b: 501 KiB rows
    assert xent.resolve("auto", None, 50304, f32, bf16) == "pallas"  # the gradient cannot overwrite the row
    assert xent.resolve("auto", None, 50300, bf16, bf16) == "pallas"  # not a multiple of 128
    with pytest.raises(ConfigError, match=r"'mosaic' cannot take.*128256 float32 logits is 513024 bytes.*225280"):
        xent.resolve("mosaic", None, 128256, f32, f32)
    with pytest.raises(ConfigError, match=r"'mosaic' cannot take.*in the logits' dtype \(float32\), not bfloat16"):
        xent.resolve("mosaic", None, 50304, f32, bf16)
    monkeypatch.setattr(xent, "hopper_or_newer", lambda sharding=None: False)
    assert xent.resolve("auto", None, 50304, bf16, bf16) == "pallas"
    with pytest.raises(ConfigError, match=r"9\.0 or newer \(Hopper\), got \S+.* \(compute capability \S+\)"):
        xent.resolve("mosaic", None, 50304, bf16, bf16)


def test_the_mosaic_kernel_off_gpus_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(xent, "mosaic_interpretable", lambda: False)
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "cpu")
    logits, labels = random_case((2,), 256)
    with pytest.raises(ConfigError, match=r"'mosaic' runs off GPUs only in Mosaic GPU's interpreter"):
        xent.loss_and_unit_grad(logits, labels, jnp.float32, "mosaic")


@needs_triton
def test_the_kernel_writes_the_compute_dtype():
    logits, labels = random_case((4,), 300, seed=1)
    got = [xent.loss_and_unit_grad(logits, labels, jnp.bfloat16, k)[1] for k in ("pallas", "xla")]
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_allclose(got[0].astype(jnp.float32), got[1].astype(jnp.float32), atol=2**-8)


@needs_triton
@needs_devices(8)
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


@needs_triton
def test_auto_takes_the_kernel_on_gpus(monkeypatch):
    assert xent.resolve("auto") == AUTO_KERNEL  # this backend's devices
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")
    assert xent.resolve("auto") == "pallas"
    with pytest.raises(ConfigError, match=r"model\.loss_kernel must be one of"):
        ModelConfig(loss_kernel="triton")


@needs_triton
@needs_devices(8)
def test_auto_keeps_xla_when_the_vocabulary_is_split(monkeypatch):
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")
    mesh = make_mesh({"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2})
    split = named(("act_batch", "act_seq", "act_vocab"), (8, 4, 64), mesh)
    whole = named(("act_batch", "act_seq", None), (8, 4, 64), mesh)
    assert (xent.resolve("auto", whole), xent.resolve("auto", split)) == ("pallas", "xla")
    with pytest.raises(ConfigError, match=r"model.loss_kernel='pallas' needs whole vocabulary rows.*'tensor'"):
        xent.resolve("pallas", split)


@needs_triton
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_loss_and_gradients_equal_for_both_kernels(family):
    assert_decoder_settings_agree(family, "loss_kernel", ("xla", "pallas"))


@needs_mosaic
def test_decoder_loss_and_gradients_equal_with_the_mosaic_kernel():
    assert_decoder_settings_agree("gpt2", "loss_kernel", ("xla", "mosaic"))


@needs_triton
def test_the_chunked_loss_keeps_xla_under_auto(monkeypatch):
    """With train.loss_chunk the forward pass is recomputed under checkpoint: 'auto' takes XLA's
    implementation there (its forward skips the gradient), the kernel elsewhere."""
    monkeypatch.setattr(xent, "sharding_platform", lambda sharding: "gpu")  # trace as on GPUs: no lowering happens
    monkeypatch.setattr(xent, "hopper_or_newer", lambda sharding=None: False)  # the Triton kernel, a pallas_call
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = jnp.zeros((2, 17), jnp.int32)
    for chunk, kernels in ((0, 1), (8, 0)):
        grad = jax.grad(lambda p, c=chunk: loss_fn(graphdef, p, batch, None, chunk=c))
        assert str(jax.make_jaxpr(grad)(params)).count("pallas_call") == kernels, chunk
