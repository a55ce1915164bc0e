"""--train.grad_accum=K: K microbatches per step, one update, equal to the whole batch at once.

Tolerance: losses and parameters relative 1e-5 (absolute floor 1e-6) after 3 steps in fp32; the
microbatch sums add the same terms in another order."""

import jax
import numpy as np
import pytest
from training import train_steps

from dsjax.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig
from dsjax.train import build

MODEL = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=256)
STEPS = 3


def config(accum: int, mesh: MeshConfig) -> Config:
    return Config(
        model=MODEL,
        mesh=mesh,
        data=DataConfig(source="default"),
        train=TrainConfig(steps=STEPS, batch_size=16, seq_len=32, lr=1e-2, warmup_steps=1, grad_accum=accum),
    )


def trained(cfg: Config, devices):
    return train_steps(cfg, devices, STEPS)[:2]


@pytest.mark.parametrize(("accum", "mesh", "n"), [(4, MeshConfig(fsdp=1), 1), (2, MeshConfig(data=2, fsdp=2), 4)])
def test_accumulated_microbatches_equal_the_whole_batch(accum, mesh, n):
    ref_losses, ref_params = trained(config(1, MeshConfig(fsdp=1)), jax.devices()[:1])
    losses, params = trained(config(accum, mesh), jax.devices()[:n])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, ref in jax.tree_util.tree_leaves_with_path(ref_params):
        np.testing.assert_allclose(flat[path], ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_a_batch_the_microbatches_cannot_split_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"train\.grad_accum x mesh\.data x mesh\.fsdp = 4 x 1 x 8 = 32"):
        build(config(4, MeshConfig(fsdp=8)), devices=jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"train\.grad_accum must be a positive integer"):
        TrainConfig(grad_accum=0)
