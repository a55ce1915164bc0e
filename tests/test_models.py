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
from dsjax.models.gpt2 import bias_gelu
from dsjax.models.layers import attention_impl
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_differentiates_as_the_composition(dtype):
    """GPT-2's GELU with its hand-written backward pass (tanh recomputed) gives autodiff's value and
    gradients of gelu(u + b), to rounding: the same operations, fused differently by XLA (fp32 relative
    1e-6; bf16 one rounding, 2^-8)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    u = (3 * jax.random.normal(k1, (2, 5, 24))).astype(dtype)
    b = jax.random.normal(k2, (24,)).astype(dtype)
    w = jax.random.normal(k3, (2, 5, 24)).astype(dtype)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda u, b: (f(u, b) * w).astype(jnp.float32).sum(), argnums=(0, 1)))

    got = loss(bias_gelu)(u, b)
    want = loss(lambda u, b: jax.nn.gelu(u + b, approximate=True))(u, b)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == c.dtype
        rtol = 1e-6 if dtype == jnp.float32 else 2**-8
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("family", list(SMALL))
def test_compute_weights_casts_what_the_block_casts(family):
    """`Decoder.compute_weights` (1F1B casts its stages' weights once, before its loop) leaves the block's
    output and the fp32 weights' gradients unchanged, bit for bit, under bf16 compute: it casts exactly the
    parameters the block would cast and keeps the norms in fp32."""
    model = Decoder(SMALL[family], rngs=nnx.Rngs(0), policy=POLICIES["bf16"])
    stage = model.stage_fn(8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 32), jnp.bfloat16)
    weights = model.blocks.arrays()
    kept = {name for name, w in model.compute_weights(weights).items() if w.dtype == jnp.float32}
    assert kept == set(FAMILIES[family].KEEP)

    def loss(cast_first):
        def f(w, x):
            return stage(model.compute_weights(w) if cast_first else w, x).astype(jnp.float32).sum()

        return jax.jit(jax.value_and_grad(f))(weights, x)

    for a, b in zip(jax.tree.leaves(loss(True)), jax.tree.leaves(loss(False)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
