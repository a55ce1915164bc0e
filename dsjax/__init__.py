"""dsjax: distributed LLM training on JAX/XLA.

The seed's spelling works: `import dsjax as ds; ds.amp.autocast(...)`, `ds.optim.GradientScaler()`,
`ds.nn.CheckpointModule(...)`. Importing dsjax does not start a JAX backend, so
`dsjax.mesh.simulate_cpu_devices(n)` and `dsjax.distributed.initialize()` may still be called afterwards.
`@ds.jit` is jax.jit with compile logging, a recompile warning and the persistent compilation cache;
`ds.CommContext()` gives rank, world size and collectives over the processes of a job.
"""

from dsjax import amp, distributed, mesh, nn, optim
from dsjax.compiling import compilation_cache, jit
from dsjax.config import Config, ConfigError, preset
from dsjax.distributed import CommContext
from dsjax.nn import CheckpointModule
from dsjax.precision import GradientScaler, autocast

__all__ = [
    "CheckpointModule",
    "CommContext",
    "Config",
    "ConfigError",
    "GradientScaler",
    "amp",
    "autocast",
    "compilation_cache",
    "distributed",
    "jit",
    "mesh",
    "nn",
    "optim",
    "preset",
]
