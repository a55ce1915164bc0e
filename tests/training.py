"""Shared by the tests: the two small model families and a few plain train steps (equivalence tests),
the loss and gradients of a tiny decoder under two settings (kernel tests), and the command-line flags of
a small model (CLI and multi-process tests)."""

import jax
import numpy as np
import pytest
from flax import nnx

from dsjax.config import Config, ModelConfig
from dsjax.models import Decoder
from dsjax.models.layers import triton_available
from dsjax.step import loss_fn
from dsjax.train import batch_at, build

# The norm, GELU, q/k/v and Triton loss kernels are written for Pallas's Triton backend (deprecated in jax 0.11).
needs_triton = pytest.mark.skipif(not triton_available(), reason="this jax lacks Pallas's Triton backend")

# `make test` runs on CPUs (tests/conftest.py); the kernel tests also run on GPUs (JAX_PLATFORMS=cuda), where
# the kernels are compiled instead of interpreted and the tests that need a mesh of 8 devices skip.
ON_GPU = jax.default_backend() == "gpu"
# What `auto` takes for the norm, GELU, q/k/v and loss kernels on this backend's devices, at sizes they take.
AUTO_KERNEL = "pallas" if ON_GPU and triton_available() else "xla"


def needs_devices(n: int):
    return pytest.mark.skipif(
        jax.device_count() < n, reason=f"needs {n} devices; {jax.default_backend()} has {jax.device_count()}"
    )


# A small model for command-line runs: compile time, and so test time, grows with the model.
SMALL_FLAGS = [
    "--model.n_layers=1",
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_kv_heads=2",
    "--model.d_ff=64",
    "--train.seq_len=32",
]


def models(n_layers: int) -> dict[str, ModelConfig]:
    """A llama with grouped-query attention (4 query heads over 2 kv heads) and a GPT-2 with tied
    embeddings, both D=32, F=64, V=256."""
    return {
        "llama": ModelConfig(
            family="llama",
            n_layers=n_layers,
            d_model=32,
            n_heads=4,
            n_kv_heads=2,
            d_ff=64,
            vocab_size=256,
            max_seq_len=32,
        ),
        "gpt2": ModelConfig(
            family="gpt2",
            n_layers=n_layers,
            d_model=32,
            n_heads=4,
            n_kv_heads=4,
            d_ff=64,
            vocab_size=256,
            max_seq_len=32,
            tie_embeddings=True,
        ),
    }


def train_steps(cfg: Config, devices, steps: int):
    """(loss of each step, parameters after them as a pure dict of arrays, the run) of `steps` train
    steps."""
    run = build(cfg, devices=devices)
    losses = []
    for step in range(steps):
        run.state, metrics = run.train_step(run.state, batch_at(run, run.train_samples, step))
        losses.append(float(metrics["loss"]))  # blocks every step: bounded steps in flight on CPU
    return losses, jax.device_get(nnx.to_pure_dict(run.state.params)), run


def assert_decoder_settings_agree(family: str, field: str, values: tuple[str, str], n_layers: int = 1, d_model=16):
    """A one-device fp32 decoder of `family` gives the same loss (relative 1e-6) and gradients (relative
    1e-5) with ModelConfig.`field` set to each of `values` (two implementations of one function; their
    sums run in different orders)."""
    batch = jax.random.randint(jax.random.key(3), (4, 17), 0, 256)
    results = []
    for value in values:
        cfg = ModelConfig(
            family=family, n_layers=n_layers, d_model=d_model, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16,
            tie_embeddings=family == "gpt2", **{field: value},
        )  # fmt: skip
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        results.append(jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss_fn(g, p, batch, None)))(params))
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_a), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
