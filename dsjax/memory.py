"""Per-device memory: what the compiled step needs, what the device has, and the preflight check.

The compiled step's footprint is taken from XLA's memory analysis of the executable: its arguments
plus outputs, less the buffers donation lets outputs reuse, plus temporaries (activations kept for the
backward pass and workspace). The check runs after compilation and before step 0, so a run that cannot
fit stops with numbers instead of dying later with an out-of-memory error.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from dsjax import distributed
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


def io_bytes(mem) -> int:
    """Bytes of a compiled step's arguments and outputs on one device, a donated buffer counted once."""
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes


def step_bytes(mem) -> int:
    """Peak bytes of one device for a compiled step (XLA `memory_analysis()`)."""
    return io_bytes(mem) + mem.temp_size_in_bytes


def device_limit(device: jax.Device) -> int | None:
    """Bytes the allocator may use on `device`, where the backend reports it (GPUs, TPUs; not CPUs)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def _cgroup_limit_files(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> list[Path]:
    """The memory-limit files of this process's control groups, its own group's and every enclosing one's
    (a SLURM job's or a systemd unit's limit sits on a group above the process, not at the root)."""
    v2, v1 = [Path("/")], [Path("/")]  # each hierarchy's root group, and this process's group in it
    with contextlib.suppress(OSError):
        for line in own.read_text().splitlines():  # v2: "0::/path"; v1: "N:memory:/path"
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2.append(Path(path))
            elif "memory" in controllers.split(","):
                v1.append(Path(path))
    files = {root / p.relative_to("/") / "memory.max" for g in v2 for p in (g, *g.parents)}
    files |= {root / "memory" / p.relative_to("/") / "memory.limit_in_bytes" for g in v1 for p in (g, *g.parents)}
    return sorted(files)


def host_memory() -> int | None:
    """Bytes of memory this process may use at most: the machine's physical memory, or the lowest limit of
    its control groups (cgroup v2 or v1) where that is lower; None where none of them can be read."""
    sizes = []
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in _cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" where a group has no limit
            sizes.append(int(text))
    return min(sizes) if sizes else None


def budget(config: Config, device: jax.Device) -> tuple[int | None, str]:
    """(bytes, where the number comes from): train.memory_budget_gb if set, else the device's limit; on CPUs,
    which report none, the machine's memory shared by the CPU devices of the job's processes on it (a step
    that needs more cannot run; one that fits may still not, as the host holds more than the step). The
    processes on the machine are known from the job's environment (dsjax.launch, torchrun, SLURM, Open MPI);
    a job joined with explicit arguments or by jax.distributed alone counts as one per machine."""
    if config.train.memory_budget_gb > 0:
        return int(config.train.memory_budget_gb * GIB), "train.memory_budget_gb"
    limit = device_limit(device)
    if limit is None and device.platform == "cpu" and (host := host_memory()):
        procs = distributed.process_env().local_world_size  # a job's processes on this machine share it too
        n = len(jax.local_devices(backend="cpu")) * procs
        where = f"{procs} processes' " if procs > 1 else ""
        return host // n, f"this machine's {fmt_bytes(host)} of memory shared by {where}{n} CPU device(s)"
    return limit, f"the JAX allocator's limit on {device.device_kind}"


def _scheduler_knob(budget_bytes: int, device: jax.Device, mem) -> str | None:
    """The XLA_FLAGS setting that has XLA's GPU scheduler plan for `budget_bytes` rather than the allocator's
    whole limit, or None where it would not apply (not a GPU, no allocator limit, a budget at or above it, a
    budget below the step's own arguments and outputs, or a slop factor already in XLA_FLAGS).

    XLA's latency-hiding scheduler plans the step's temporaries against (allocator limit - arguments and
    outputs) x slop factor / 100 (95 by default) and spends what it sees free on overlapping work: unrolled
    GPipe, llama-1b on 2 H200s at batch 32, compiled to 72.4 GiB at 95, 66.2 GiB at 50 (0.7-1.0% slower) and
    67.7 GiB with the allocator itself limited to 71.7 GiB (experiments/RESULTS.md, 2026-11-30). The factor
    named here gives the limit the scheduler would take if the allocator's limit were the budget."""
    allocator = device_limit(device) if device.platform == "gpu" else None
    io = io_bytes(mem)
    if not allocator or budget_bytes >= allocator or budget_bytes <= io:
        return None
    if "xla_gpu_memory_limit_slop_factor" in os.environ.get("XLA_FLAGS", ""):
        return None
    slop = max(1, int(95 * (budget_bytes - io) / (allocator - io)))
    return (
        f"XLA_FLAGS=--xla_gpu_memory_limit_slop_factor={slop} in the environment (XLA's default is 95), so that "
        f"XLA's scheduler plans for this budget rather than the allocator's {fmt_bytes(allocator)}, which it "
        "otherwise fills to overlap work (unrolled GPipe on 2 H200s: 72.4 GiB at 95, 66.2 GiB at 50 and about 1% "
        "slower, and not yet run together with a budget)"
    )


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
    if config.remat.policy != "none" and not config.remat.prevent_cse and not config.model.scan_layers:
        knobs.append(
            "--remat.prevent_cse=true, so that XLA cannot merge the recomputation into the forward pass "
            "(llama-1b batch 12 on one H200: 53.4 instead of 60.5 GiB, 1.35% slower)"
        )
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
    if knob := _scheduler_knob(limit, device, mem):  # None where the budget is the allocator's own limit
        knobs.append(knob)
    if config.precision.policy == "fp32":
        knobs.append("--precision.policy=bf16 (half-size activations)")
    if source != "train.memory_budget_gb":  # the budget is the device's (or, on CPUs, the machine's) own
        knobs.append(
            "a GPU, or a machine with more memory (--train.memory_budget_gb=N checks against N GiB a device "
            "instead, where you know the machine can give more)"
            if device.platform == "cpu"
            else "a larger XLA_PYTHON_CLIENT_MEM_FRACTION (dsjax sets 0.9 where it is unset)"
        )
    raise ConfigError(
        f"the compiled train step needs {fmt_bytes(need)} per device (arguments "
        f"{fmt_bytes(mem.argument_size_in_bytes)} + outputs {fmt_bytes(mem.output_size_in_bytes)} - donated "
        f"{fmt_bytes(mem.alias_size_in_bytes)} + temporaries {fmt_bytes(mem.temp_size_in_bytes)}), more than the "
        f"{fmt_bytes(limit)} budget ({source}). What would help: " + "; ".join(knobs) + "."
    )
