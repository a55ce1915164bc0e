"""dsjax: distributed LLM training on JAX/XLA.

The seed's spelling works: `import dsjax as ds; ds.amp.autocast(...)`, `ds.optim.GradientScaler()`,
`ds.nn.CheckpointModule(...)`. Importing dsjax does not start a JAX backend, so
`dsjax.mesh.simulate_cpu_devices(n)` may still be called afterwards.
"""

from dsjax import amp, mesh, nn, optim
from dsjax.config import Config, ConfigError, preset
from dsjax.nn import CheckpointModule
from dsjax.precision import GradientScaler, autocast

__all__ = [
    "CheckpointModule",
    "Config",
    "ConfigError",
    "GradientScaler",
    "amp",
    "autocast",
    "mesh",
    "nn",
    "optim",
    "preset",
]
