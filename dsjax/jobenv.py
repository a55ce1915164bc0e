"""Which job this process belongs to, read from the environment: the conventions of torchrun, Kubernetes
Indexed Jobs, SLURM and Open MPI, and the errors for variables that contradict each other; and the
variable that sizes XLA's CPU thread pool for simulated devices. Pure Python: nothing here touches JAX
(dsjax.distributed starts the job).

Conventions (a variable set by two of them must agree; explicit initialize() arguments override all):

  torchrun style  WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT [, LOCAL_RANK, LOCAL_WORLD_SIZE]
                  (also what `python -m dsjax.launch` sets)
  Kubernetes      JOB_COMPLETION_INDEX (an Indexed Job) as the rank, with WORLD_SIZE, MASTER_ADDR and
                  MASTER_PORT set in the pod template (MASTER_ADDR = the headless service name of pod 0)
  SLURM (srun)    SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_LOCALID, the first host of SLURM_STEP_NODELIST /
                  SLURM_JOB_NODELIST; port MASTER_PORT or one derived from the job id (a batch script's
                  own step, outside srun, is one process)
  Open MPI        OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK,
                  OMPI_COMM_WORLD_LOCAL_SIZE; coordinator MASTER_ADDR:MASTER_PORT
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from dsjax.config import ConfigError

DEFAULT_PORT = 29481  # SLURM / Open MPI without MASTER_PORT: this plus (job id mod 1000)

# XLA's CPU client runs the programs of all a process's devices on one pool of threads, the pool its ops
# also split their work over: max(cores, devices) threads, where PJRT_NPROC (or NPROC), when set, stands in
# for the core count. A collective keeps its thread while it waits for the other devices. A program whose
# collectives can run side by side (the 1F1B step: one inside the tick loop, one beside it) can then have
# every thread waiting for a device that has no thread left, and XLA's rendezvous timeout aborts the
# process after 40 s. On a 2-core machine with 8 simulated devices (8 threads): the 1F1B test step, loaded
# from the compilation cache, aborted in 5 of 12 runs; with 32 threads, in none of 10. Four threads
# per device is that measurement, not a bound derived for every program. The suite's pipeline and layout
# tests took 391 s with 8 threads and 395 s with 32 on that machine.
CPU_THREADS_PER_DEVICE = 4
# Simulated CPU devices on one machine, over all its processes: each brings its own threads, and 4096 of them
# took minutes to start (a --cpu-devices=4096 run seemed to hang).
MAX_CPU_DEVICES = 512


class DistributedError(RuntimeError):
    """A multi-process job could not start, or its processes did not meet (a barrier or collective
    timed out, processes called different collectives); the message names the processes and the wait."""


class JobConfigError(DistributedError, ConfigError):
    """The environment or arguments do not describe a consistent job, or a collective was called with
    arguments it cannot take; the message names the variables or values. A ConfigError: exit 2."""


@dataclasses.dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits in the job."""

    num_processes: int
    process_id: int
    local_rank: int = 0  # index among the processes on this host
    local_world_size: int = 1  # processes on this host
    coordinator: str | None = None  # host:port of process 0's coordination service
    source: str = "single"  # which convention described it: explicit, torchrun, kubernetes, slurm, openmpi

    def describe(self) -> str:
        if self.num_processes == 1:
            return "1 process"
        return (
            f"process {self.process_id} of {self.num_processes} (local rank {self.local_rank} of "
            f"{self.local_world_size}), coordinator {self.coordinator}, from {self.source}"
        )


# ----------------------------------------------------------------------------------------------------
# Reading the environment


def _int(env: Mapping[str, str], name: str, low: int = 0) -> int:
    raw = env.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise JobConfigError(f"environment variable {name}={raw!r} is not an integer.") from None
    if value < low:
        raise JobConfigError(f"environment variable {name}={value} must be >= {low}.")
    return value


def _require(env: Mapping[str, str], names: Sequence[str], convention: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        have = ", ".join(f"{n}={env[n]}" for n in names if env.get(n))
        raise JobConfigError(
            f"the environment looks like a {convention} job ({have or 'partly set'}) but lacks "
            f"{', '.join(missing)}; set all of {', '.join(names)} (or none of them for a single process)."
        )


def _address(env: Mapping[str, str], host_var: str, port: int | None, convention: str) -> str:
    host = env.get(host_var)
    if not host:
        raise JobConfigError(f"a {convention} job needs {host_var} (the host of process 0).")
    if port is None:
        port = _int(env, "MASTER_PORT", 1)
    if not 0 < port < 65536:
        raise JobConfigError(f"the coordinator port {port} is outside 1..65535 (MASTER_PORT).")
    return f"{host}:{port}"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise JobConfigError(f"cannot read the SLURM node list {nodelist!r}.")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(env: Mapping[str, str] | None = None) -> ProcessEnv:
    """This process's place in the job, read from `env` (default os.environ) by the conventions in the
    module docstring; a single process when none applies. Inconsistent variables are a DistributedError."""
    env = os.environ if env is None else env
    found: list[ProcessEnv] = []
    if any(env.get(n) for n in ("WORLD_SIZE", "RANK")) and "JOB_COMPLETION_INDEX" not in env:
        _require(env, ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"), "torchrun-style")
        n = _int(env, "WORLD_SIZE", 1)
        # Without LOCAL_* the host's share is unknown: assume one process per host (never restrict GPUs).
        local = _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0
        local_n = _int(env, "LOCAL_WORLD_SIZE", 1) if env.get("LOCAL_WORLD_SIZE") else local + 1
        found.append(
            ProcessEnv(n, _int(env, "RANK"), local, local_n, _address(env, "MASTER_ADDR", None, "torchrun"), "torchrun")
        )
    elif "JOB_COMPLETION_INDEX" in env:
        _require(env, ("JOB_COMPLETION_INDEX", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"), "Kubernetes Indexed Job")
        rank = _int(env, "JOB_COMPLETION_INDEX")
        if env.get("RANK") and _int(env, "RANK") != rank:
            raise JobConfigError(
                f"RANK={env['RANK']} disagrees with JOB_COMPLETION_INDEX={rank}; unset RANK on an Indexed Job."
            )
        n = _int(env, "WORLD_SIZE", 1)
        found.append(ProcessEnv(n, rank, 0, 1, _address(env, "MASTER_ADDR", None, "Kubernetes"), "kubernetes"))
    # srun sets SLURM_STEP_NUM_TASKS; a batch script's own step (no srun) has SLURM_NTASKS but is one process.
    if env.get("SLURM_PROCID") and env.get("SLURM_STEP_NUM_TASKS"):
        n, rank = _int(env, "SLURM_STEP_NUM_TASKS", 1), _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        local_n = int(re.match(r"\d+", per_node).group()) if re.match(r"\d+", per_node) else 1
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if n > 1 and not nodes:
            raise JobConfigError("a SLURM step of several tasks needs SLURM_STEP_NODELIST or SLURM_JOB_NODELIST.")
        port = _int(env, "MASTER_PORT", 1) if env.get("MASTER_PORT") else None
        if port is None:
            port = DEFAULT_PORT + (_int(env, "SLURM_JOB_ID") % 1000 if env.get("SLURM_JOB_ID") else 0)
        host = first_slurm_host(nodes) if nodes else "127.0.0.1"
        found.append(ProcessEnv(n, rank, local, max(local_n, local + 1), f"{host}:{port}", "slurm"))
    if env.get("OMPI_COMM_WORLD_SIZE"):
        _require(env, ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), "Open MPI")
        n, rank = _int(env, "OMPI_COMM_WORLD_SIZE", 1), _int(env, "OMPI_COMM_WORLD_RANK")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if env.get("OMPI_COMM_WORLD_LOCAL_RANK") else 0
        local_n = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1) if env.get("OMPI_COMM_WORLD_LOCAL_SIZE") else 1
        address = _address(env, "MASTER_ADDR", DEFAULT_PORT, "Open MPI") if n > 1 else None
        if n > 1 and env.get("MASTER_PORT"):
            address = _address(env, "MASTER_ADDR", None, "Open MPI")
        found.append(ProcessEnv(n, rank, local, local_n, address, "openmpi"))
    if not found:
        return ProcessEnv(1, 0)
    first = found[0]
    for other in found[1:]:
        if (other.num_processes, other.process_id) != (first.num_processes, first.process_id):
            raise JobConfigError(
                f"the environment describes two different jobs: {first.source} says process "
                f"{first.process_id} of {first.num_processes}, {other.source} says process {other.process_id} "
                f"of {other.num_processes}. Launch with one of them, or make them agree."
            )
    for p in found:
        if not 0 <= p.process_id < p.num_processes:
            raise JobConfigError(
                f"{p.source}: rank {p.process_id} is outside 0..{p.num_processes - 1} (world size {p.num_processes})."
            )
        if not 0 <= p.local_rank < p.local_world_size:
            raise JobConfigError(
                f"{p.source}: local rank {p.local_rank} is outside 0..{p.local_world_size - 1} "
                f"(local world size {p.local_world_size})."
            )
    return first


def cpu_thread_env(n_devices: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variable to set, before JAX starts its CPU backend, for a process with `n_devices` simulated
    CPU devices: PJRT_NPROC, CPU_THREADS_PER_DEVICE threads per device or the cores this process may use if
    more. Empty when `env` (default os.environ) sets PJRT_NPROC or NPROC already: that choice stands."""
    env = os.environ if env is None else env
    if "PJRT_NPROC" in env or "NPROC" in env:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"PJRT_NPROC": str(max(cores, CPU_THREADS_PER_DEVICE * n_devices))}
