"""Every parallel layout trains exactly like one device (fp32, 5 steps, 8 simulated CPU devices).

Tolerances: losses relative 1e-5; parameters relative 1e-5 with an absolute floor of 1e-6 (a sharded
reduction sums in a different order, fp32 rounding ~1e-7 relative per add). One exception: GPT-2's key
bias `bk` has an analytically zero gradient (q.bk is the same for every key, and softmax ignores a
shift), so its "gradient" is rounding noise that AdamW normalises into ~1e-6 steps in a layout-dependent
direction. It is checked to stay at that noise level instead of element by element.
"""

import jax
import numpy as np
import pytest
from training import models, train_steps

from dsjax.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

STEPS = 5
LAYOUTS = {
    "data8": MeshConfig(data=8, fsdp=1),
    "fsdp8": MeshConfig(fsdp=8),
    "tensor2_fsdp4": MeshConfig(fsdp=4, tensor=2),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
}
MODELS = models(n_layers=2)


def config(model: ModelConfig, mesh: MeshConfig) -> Config:
    return Config(
        model=model,
        mesh=mesh,
        data=DataConfig(source="default"),
        train=TrainConfig(steps=STEPS, batch_size=16, seq_len=32, lr=1e-2, warmup_steps=2),
    )


def train_losses(cfg: Config, devices):
    return train_steps(cfg, devices, STEPS)


_reference: dict[str, tuple] = {}


def reference(family: str):
    if family not in _reference:
        _reference[family] = train_losses(config(MODELS[family], MeshConfig(fsdp=1)), jax.devices()[:1])[:2]
    return _reference[family]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(family, layout, capfd):
    ref_losses, ref_params = reference(family)
    capfd.readouterr()
    losses, params, run = train_losses(config(MODELS[family], LAYOUTS[layout]), jax.devices())
    # XLA warns on stderr when a sharding choice forces it to replicate a whole tensor mid-step.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    # The layout really is sharded: some parameter is split over each axis with degree > 1.
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(run.state.params)}
    for axis, degree in run.degrees.items():
        if degree > 1 and axis != "data":
            assert any(axis in s for s in specs), (axis, specs)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, ref in flat_ref:
        if jax.tree_util.keystr(path) == "['blocks']['bk']":
            assert np.abs(flat[path]).max() < 1e-5 and np.abs(ref).max() < 1e-5
            continue
        np.testing.assert_allclose(flat[path], ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
