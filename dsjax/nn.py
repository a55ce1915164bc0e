"""Module wrappers: `CheckpointModule`, the seed's activation checkpointing for any Flax NNX module."""

from __future__ import annotations

import jax
from flax import nnx

from dsjax.config import ConfigError
from dsjax.remat import REMAT_POLICIES, check_platform


class CheckpointModule(nnx.Module):
    """Wrap `module` so its activations are recomputed in the backward pass instead of stored.

    Like the seed's `CheckpointModule(nn.Linear(1024, 2048))`: only the inputs are kept (policy 'full');
    another named policy from `dsjax.remat.REMAT_POLICIES` keeps what it names ('dots', 'minimal', ...).
    Calls are forwarded unchanged: `CheckpointModule(m)(x) == m(x)`, and so are its gradients.
    """

    def __init__(self, module: nnx.Module, policy: str = "full"):
        if policy not in REMAT_POLICIES:
            raise ConfigError(f"CheckpointModule policy must be one of {tuple(REMAT_POLICIES)}, got {policy!r}.")
        check_platform(policy, jax.default_backend())
        self.module = module
        self.policy = policy

    def __call__(self, *args, **kwargs):
        if self.policy == "none":
            return self.module(*args, **kwargs)

        def run(module, *args):
            return module(*args, **kwargs)

        return nnx.remat(run, policy=REMAT_POLICIES[self.policy], prevent_cse=True)(self.module, *args)
