"""dsjax: distributed LLM training on JAX/XLA.

The seed's spelling works: `import dsjax as ds; ds.amp.autocast(...)`, `ds.optim.GradientScaler()`,
`ds.nn.CheckpointModule(...)`. Importing dsjax does not start a JAX backend, so
`dsjax.mesh.simulate_cpu_devices(n)` and `dsjax.distributed.initialize()` may still be called afterwards.
`@ds.jit` is jax.jit with compile logging, a recompile warning and the persistent compilation cache;
`ds.CommContext()` gives rank, world size and collectives over the processes of a job.

The names below load on first use, so `python -m dsjax.launch` (which only starts processes) does not
pay for importing JAX.
"""

import importlib

_SUBMODULES = ("amp", "distributed", "mesh", "nn", "optim")
_NAMES = {
    "CheckpointModule": "dsjax.nn",
    "CommContext": "dsjax.distributed",
    "Config": "dsjax.config",
    "ConfigError": "dsjax.config",
    "GradientScaler": "dsjax.precision",
    "autocast": "dsjax.precision",
    "compilation_cache": "dsjax.compiling",
    "jit": "dsjax.compiling",
    "preset": "dsjax.config",
}

__all__ = sorted([*_SUBMODULES, *_NAMES])


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"dsjax.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'dsjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
