"""Per-device memory: what the compiled step needs, what the device has, and the preflight check.

The compiled step's footprint is taken from XLA's memory analysis of the executable: its arguments
plus outputs, less the buffers donation lets outputs reuse, plus temporaries (activations kept for the
backward pass and workspace). The check runs after compilation and before step 0, so a run that cannot
fit stops with numbers instead of dying later with an out-of-memory error.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsjax.config import Config, ConfigError
from dsjax.pipeline import Plan

GIB = 2**30


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (the largest shard of each leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def step_bytes(mem) -> int:
    """Peak bytes of one device for a compiled step (XLA `memory_analysis()`)."""
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def device_limit(device: jax.Device) -> int | None:
    """Bytes the allocator may use on `device`, where the backend reports it (GPUs, TPUs; not CPUs)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def budget(config: Config, device: jax.Device) -> tuple[int | None, str]:
    """(bytes, where the number comes from): train.memory_budget_gb if set, else the device's limit."""
    if config.train.memory_budget_gb > 0:
        return int(config.train.memory_budget_gb * GIB), "train.memory_budget_gb"
    return device_limit(device), f"the JAX allocator's limit on {device.device_kind}"


def preflight(config: Config, mem, device: jax.Device, degrees: dict[str, int]) -> None:
    """Raise ConfigError when the compiled step needs more than the budget, naming the knobs that help."""
    limit, source = budget(config, device)
    if mem is None or limit is None:
        return
    need = step_bytes(mem)
    if need <= limit:
        return
    knobs = []
    if config.remat.policy != "full":
        knobs.append(f"--remat.policy=full (now {config.remat.policy}; 'minimal' or 'dots' save less)")
    knobs.append(f"a larger --mesh.fsdp (now {degrees['fsdp']}) to shard parameters and optimizer state further")
    knobs.append(f"a smaller --train.batch_size (now {config.train.batch_size})")
    if config.train.loss_chunk == 0:
        knobs.append(
            "--train.loss_chunk=N to run the LM head and loss over N positions at a time (fp32 logits "
            "of a large vocabulary are often the largest activation; about 7% slower when measured)"
        )
    if degrees["pipeline"] > 1 and Plan.of(config.pipeline, degrees["pipeline"]).unroll:
        knobs.append(
            "--pipeline.unroll=false to run the pipeline's ticks as scans (llama-1b on 2 H200s, batch 32: "
            "GPipe 63.3 instead of 72.4 GiB and 5-7% slower, circular 62.9 instead of 70.8 GiB and 5% slower), or "
            "--pipeline.schedule=1f1b"
        )
    device_max = device_limit(device) if device.platform == "gpu" else None
    if source == "train.memory_budget_gb" and device_max and limit < device_max:
        slop = max(1, int(95 * limit / device_max))
        knobs.append(
            f"XLA_FLAGS=--xla_gpu_memory_limit_slop_factor={slop} (XLA's default is 95): XLA's scheduler plans "
            f"against the allocator's {fmt_bytes(device_max)}, not this budget, and spends memory it sees free on "
            "overlapping work; this scales its limit down to the budget (unrolled GPipe, llama-1b on 2 H200s, "
            "batch 32: 72.4 GiB at 95, 66.2 GiB at 50 and 0.8% slower)"
        )
    if config.precision.policy == "fp32":
        knobs.append("--precision.policy=bf16 (half-size activations)")
    if source != "train.memory_budget_gb":
        knobs.append("a larger XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75% of a GPU by default)")
    raise ConfigError(
        f"the compiled train step needs {fmt_bytes(need)} per device (arguments "
        f"{fmt_bytes(mem.argument_size_in_bytes)} + outputs {fmt_bytes(mem.output_size_in_bytes)} - donated "
        f"{fmt_bytes(mem.alias_size_in_bytes)} + temporaries {fmt_bytes(mem.temp_size_in_bytes)}), more than the "
        f"{fmt_bytes(limit)} budget ({source}). What would help: " + "; ".join(knobs) + "."
    )
