"""Device mesh: degree resolution and checks against the device count, and `jax.make_mesh`.

The mesh has four named axes in a fixed order, (data, pipeline, fsdp, tensor): tensor is innermost so
its heavy per-layer collectives stay between neighbouring devices (NVLink peers), data outermost since
it only reduces gradients once a step. All axes are `AxisType.Auto`: dsjax states shardings explicitly
(in/out shardings and `constrain`) and lets GSPMD propagate the rest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
from jax.sharding import AxisType

from dsjax.config import Config, ConfigError, MeshConfig, check_tensor_degree
from dsjax.jobenv import MAX_CPU_DEVICES, cpu_thread_env
from dsjax.sharding import MESH_AXES


def simulate_cpu_devices(n: int) -> None:
    """Make JAX expose `n` CPU devices, with the threads their collectives need (jobenv.cpu_thread_env).
    Must run before JAX initialises a backend (first array op)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise ConfigError(f"--cpu-devices (simulate_cpu_devices) takes an integer, got {n!r} ({type(n).__name__}).")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and jax.device_count() == n:
            return  # already so (a notebook cell run twice)
        raise ConfigError(
            f"simulate_cpu_devices({n}) must run before JAX starts its devices, and this process already has "
            f"{jax.device_count()} {jax.default_backend()} device(s) (an array, a jit or jax.devices() ran first). "
            "In a notebook, restart the kernel and call it in the first cell."
        )
    if not 1 <= n <= MAX_CPU_DEVICES:
        raise ConfigError(
            f"--cpu-devices must be between 1 and {MAX_CPU_DEVICES}, got {n}: each simulated device brings its "
            "own threads, and thousands of them take minutes to start and stop on one machine."
        )
    os.environ.update(cpu_thread_env(n))
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def resolve_degrees(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Degrees in axis order with any -1 replaced by 'the rest'; their product must equal `n_devices`."""
    degrees = mesh.degrees()
    fixed = math.prod(d for d in degrees.values() if d != -1)
    listed = ", ".join(f"mesh.{k}={v}" for k, v in degrees.items())
    if -1 in degrees.values():
        rest = next(k for k, v in degrees.items() if v == -1)
        if n_devices % fixed:
            raise ConfigError(
                f"mesh.{rest}=-1 takes the devices left over, but the other degrees multiply to {fixed}, "
                f"which does not divide the {n_devices} devices ({listed})."
            )
        degrees[rest] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(
            f"the mesh degrees multiply to {fixed} but there are {n_devices} devices ({listed}); make the "
            "product equal the device count, or set one degree to -1 to take the rest."
        )
    return degrees


def check_config(config: Config, n_devices: int) -> dict[str, int]:
    """All checks that need the device count; returns the resolved degrees."""
    degrees = resolve_degrees(config.mesh, n_devices)
    batch_shards = degrees["data"] * degrees["fsdp"]
    if config.train.batch_size % batch_shards:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by mesh.data x mesh.fsdp "
            f"= {degrees['data']} x {degrees['fsdp']} = {batch_shards}: each of those devices takes an equal "
            "share of the global batch."
        )
    accum = config.train.grad_accum
    if config.train.batch_size % (accum * batch_shards):
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by train.grad_accum x mesh.data x "
            f"mesh.fsdp = {accum} x {degrees['data']} x {degrees['fsdp']} = {accum * batch_shards}: each of the "
            f"{accum} microbatches is split evenly over the {batch_shards} batch shards."
        )
    check_tensor_degree(config.model, degrees["tensor"])  # again: the dataclass may only have seen -1
    from dsjax.pipeline import make_plan

    make_plan(config, degrees)  # validates the layers, batch and remat groups against the stages
    return degrees


def make_mesh(degrees: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with axes (data, pipeline, fsdp, tensor)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = tuple(degrees[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, got {len(devices)}."
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
