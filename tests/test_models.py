"""Model structure: causality, parameter counts, attention selection, and the FLOPs/MFU accounting."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import ConfigError, ModelConfig, preset
from dsjax.metrics import flops_per_token, peak_flops
from dsjax.models import Decoder, param_counts
from dsjax.models.decoder import FAMILIES
from dsjax.models.gelu import bias_gelu
from dsjax.models.layers import Precast, attention_impl, einsum_sides, project
from dsjax.models.llama import swiglu
from dsjax.precision import POLICIES

SMALL = {
    "llama": ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16),
    "gpt2": ModelConfig(
        family="gpt2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=16, tie_embeddings=True
    ),
}


@pytest.mark.parametrize("family", list(SMALL))
def test_decoder_is_causal(family):
    model = Decoder(SMALL[family], rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a[:, :10], b[:, :10])  # the past does not see the future
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_tied_embeddings_have_no_separate_head():
    tied = nnx.state(Decoder(SMALL["gpt2"], rngs=nnx.Rngs(0)), nnx.Param)
    untied = nnx.state(Decoder(SMALL["llama"], rngs=nnx.Rngs(0)), nnx.Param)
    assert "lm_head" not in tied and "positions" in tied
    assert "lm_head" in untied and "positions" not in untied


def test_gpt2_124m_parameter_count_matches_nanogpt():
    cfg = preset("gpt2-124m").model
    params = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    total, matmul = param_counts(params, cfg)
    assert total == 124_475_904  # nanoGPT's GPT-2 small with the vocabulary padded to 50304
    assert matmul == total - 1024 * 768  # learned positions are a gather; the tied table is the LM head


def test_flops_per_token_follows_palm():
    cfg = preset("gpt2-124m").model
    palm, causal = flops_per_token(cfg, 123_689_472, 1024)
    attention = 12 * 12 * 12 * 64 * 1024
    assert palm == 6 * 123_689_472 + attention
    assert causal == 6 * 123_689_472 + attention / 2


def test_peak_table():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert peak_flops(device("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert peak_flops(device("NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert peak_flops(device("NVIDIA H100 80GB HBM3"), "float32") == 494.5e12
    assert peak_flops(device("cpu"), "float32") is None
    assert peak_flops(jax.devices()[0]) is None


def test_attention_selection():
    assert attention_impl("xla", jnp.bfloat16, 64) == "xla"
    assert attention_impl("cudnn", jnp.bfloat16, 64, platform="gpu") == "cudnn"  # explicit choice is honoured
    assert attention_impl("auto", jnp.bfloat16, 64) == "xla"  # on CPU
    assert attention_impl("auto", jnp.float32, 64) == "xla"
    assert attention_impl("auto", jnp.bfloat16, 64, platform="gpu") == "cudnn"
    assert attention_impl("auto", jnp.float32, 64, platform="gpu") == "xla"  # cuDNN has no fp32 kernel
    assert attention_impl("auto", jnp.bfloat16, 256, platform="gpu") == "xla"  # head dim too large
    with pytest.raises(ConfigError, match="needs a GPU"):
        attention_impl("cudnn", jnp.float32, 64, platform="gpu")


def _assert_differentiates_as(f, reference, args, w):
    """f(*args) has reference's value and gradients (of the loss sum(f * w), in w's dtype): fp32 to relative
    1e-6, 16-bit to one rounding (2^-8)."""

    def value_and_grads(fn):
        loss = lambda *a: (fn(*a) * w).astype(jnp.float32).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)

    rtol = 1e-6 if w.dtype == jnp.float32 else 2**-8
    for a, c in zip(jax.tree.leaves(value_and_grads(f)), jax.tree.leaves(value_and_grads(reference)), strict=True):
        assert a.dtype == c.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_differentiates_as_the_composition(dtype):
    """GPT-2's GELU with its hand-written backward pass (tanh recomputed) gives autodiff's value and
    gradients of gelu(u + b), to rounding: the same operations, fused differently by XLA (fp32 relative
    1e-6; bf16 one rounding, 2^-8)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    u = (3 * jax.random.normal(k1, (2, 5, 24))).astype(dtype)
    b = jax.random.normal(k2, (24,)).astype(dtype)
    w = jax.random.normal(k3, (2, 5, 24)).astype(dtype)
    _assert_differentiates_as(bias_gelu, lambda u, b: jax.nn.gelu(u + b, approximate=True), (u, b), w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_swiglu_differentiates_as_the_composition(dtype):
    """llama's silu(gate) * up gives autodiff's value and gradients in every dtype: in fp16 through its
    hand-written backward pass (the sigmoid recomputed behind an optimization barrier, which the gradient's
    program must hold), elsewhere through autodiff itself (fp32 relative 1e-6; 16-bit one rounding, 2^-8)."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    gate = (3 * jax.random.normal(k1, (2, 5, 24))).astype(dtype)
    up = jax.random.normal(k2, (2, 5, 24)).astype(dtype)
    w = jax.random.normal(k3, (2, 5, 24)).astype(dtype)
    _assert_differentiates_as(swiglu, lambda g, u: jax.nn.silu(g) * u, (gate, up), w)
    custom = "custom_vjp_call" in str(jax.make_jaxpr(swiglu)(gate, up))
    barrier = "optimization_barrier" in str(jax.make_jaxpr(jax.grad(lambda g, u: swiglu(g, u).sum()))(gate, up))
    assert custom == barrier == (dtype == jnp.float16)


@pytest.mark.parametrize("family", list(SMALL))
def test_compute_weights_casts_what_the_block_casts(family):
    """`Decoder.compute_weights` (the pipeline casts its stages' weights once, before its loop) leaves the
    block's output and the gradients of the weights it casts unchanged, bit for bit, under bf16 compute: it
    casts exactly the parameters the block would cast and keeps the norms in fp32. The matmul weights come
    as `Precast`, whose gradients are the GEMMs' fp32 results: the plain path's within bf16 rounding."""
    family_module = FAMILIES[family]
    model = Decoder(SMALL[family], rngs=nnx.Rngs(0), policy=POLICIES["bf16"])
    stage = model.stage_fn(8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 32), jnp.bfloat16)
    weights = model.blocks.arrays()
    cast = model.compute_weights(weights)
    assert {name for name, w in cast.items() if isinstance(w, Precast)} == set(family_module.PROJECTIONS)
    kept = {name for name, w in cast.items() if not isinstance(w, Precast) and w.dtype == jnp.float32}
    assert kept == set(family_module.KEEP)

    def loss(cast_first):
        def f(w, x):
            return stage(model.compute_weights(w) if cast_first else w, x).astype(jnp.float32).sum()

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(weights, x)

    (loss_a, (grads_a, x_a)), (loss_b, (grads_b, x_b)) = loss(True), loss(False)
    np.testing.assert_array_equal(np.asarray(loss_a), np.asarray(loss_b))
    np.testing.assert_array_equal(np.asarray(x_a, np.float32), np.asarray(x_b, np.float32))
    for name in weights:
        a, b = grads_a[name], grads_b[name]
        assert a.dtype == b.dtype == jnp.float32
        if name in family_module.PROJECTIONS:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2**-8, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec, w_shape", [("BTD,DNH->BTNH", (16, 3, 8)), ("BTNH,NHD->BTD", (3, 8, 16))])
def test_a_precast_weight_takes_its_gradient_from_the_gemm_in_fp32(spec, w_shape):
    """`project` with a `Precast` weight: the same forward pass and input gradient as the einsum of the cast,
    and the weight's gradient the fp32 result of the GEMM of the bf16 input and cotangent, never rounded to
    bf16 (a pipeline's fp32 accumulators then take it straight from the GEMM)."""
    lhs, rhs, out = einsum_sides(spec)
    keys = jax.random.split(jax.random.key(0), 3)
    x_shape = (2, 4, *[w_shape[rhs.index(c)] for c in lhs[2:]])
    x = jax.random.normal(keys[0], x_shape, jnp.bfloat16)
    w = jax.random.normal(keys[1], w_shape, jnp.float32)
    y_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w.astype(jnp.bfloat16))).shape
    c = jax.random.normal(keys[2], y_shape, jnp.float32)

    def f(precast):
        def loss(w, x):
            wc = Precast(w, w.astype(jnp.bfloat16)) if precast else w.astype(jnp.bfloat16)
            return (project(spec, x, wc).astype(jnp.float32) * c).sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, x)

    (la, (wa, xa)), (lb, (wb, xb)) = f(True), f(False)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    np.testing.assert_array_equal(np.asarray(xa, np.float32), np.asarray(xb, np.float32))
    g = c.astype(jnp.bfloat16)  # the cotangent of the bf16 output
    want = jax.jit(lambda: jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32))()
    assert wa.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wa), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the plain path's gradient is that product rounded to bf16 (on hardware that does not skip the rounding)
    np.testing.assert_allclose(np.asarray(wb), np.asarray(want), rtol=2**-8, atol=1e-6)
