"""Shared by the tests: the two small model families and a few plain train steps (equivalence tests),
and the command-line flags of a small model (CLI and multi-process tests)."""

import jax
from flax import nnx

from dsjax.config import Config, ModelConfig
from dsjax.train import batch_at, build

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
