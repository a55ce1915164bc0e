"""Multi-process runs: who am I (from the environment), `jax.distributed` start-up, dead-peer detection,
and CommContext, the seed's process-group collectives.

Everything here stands on `jax.distributed` and XLA's collectives (NCCL on GPUs, Gloo on CPUs); dsjax
has no network layer of its own. The one extra is a liveness watch: each process bumps a counter in the
coordination service's key-value store every `interval` seconds, and a process whose counter has not
moved for `timeout_s` (or that posted a failure) makes the others exit with a message naming it, before
XLA's own heartbeat check (set a little later) would abort them with a less specific one.

The job is read from the environment by dsjax.jobenv (torchrun, Kubernetes, SLURM, Open MPI).

DSJAX_PEER_TIMEOUT (seconds, default 60) bounds how long a dead peer can hold up the others.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.jobenv import DistributedError, JobConfigError, ProcessEnv, detect

BACKENDS = ("auto", "nccl", "gloo")
OPS = ("sum", "mean", "max", "min")
DEFAULT_PEER_TIMEOUT_S = 60.0
PEER_LOST_EXIT_CODE = 76  # a process ended because another one died or failed


# ----------------------------------------------------------------------------------------------------
# Start-up


def _local_gpus(found: ProcessEnv, visible: str | None) -> list[int] | None:
    """This process's share of the host's GPUs when several processes share a host (CUDA numbering after
    CUDA_VISIBLE_DEVICES; ignored on CPUs): GPU `local_rank` when nothing restricts them, the local
    rank's block when CUDA_VISIBLE_DEVICES lists the whole host's GPUs to every process (SLURM with
    --gres), nothing when it already gives each process its own (a launcher, --gpus-per-task)."""
    n = found.local_world_size
    if n <= 1:
        return None
    if visible is None:
        return [found.local_rank]
    count = len([d for d in visible.split(",") if d.strip()])
    if count < n:
        return None
    per = count // n
    return list(range(found.local_rank * per, (found.local_rank + 1) * per))


_state: dict = {"env": None, "watch": None}
_sequence = {"barrier": 0, "agree": 0}  # every process makes the same calls in the same order


def _client():
    from jax._src import distributed as jax_distributed  # the coordination service client jax started

    return jax_distributed.global_state.client


def process_env() -> ProcessEnv:
    """The ProcessEnv that `initialize` set up; a single process if neither it nor jax.distributed ran."""
    if _state["env"] is None and _client() is not None:
        return ProcessEnv(jax.process_count(), jax.process_index(), source="jax.distributed")
    return _state["env"] or ProcessEnv(1, 0)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    backend: str = "auto",
    peer_timeout_s: float | None = None,
    init_timeout_s: int = 300,
    env: Mapping[str, str] | None = None,
) -> ProcessEnv:
    """Join the job that the arguments (or else the environment) describe; call it once, first thing,
    before anything touches JAX devices. With one process this only applies `backend`.

    backend: "auto" (NCCL on GPUs, Gloo on CPUs), "gloo" (CPU devices only) or "nccl" (GPUs required).
    peer_timeout_s: how long a silent or dead peer may hold the others up before they exit
    (PEER_LOST_EXIT_CODE, naming it); default DSJAX_PEER_TIMEOUT or 60 s.

    SIGTERM keeps the handler it had before (called from the main thread): jax.distributed's own handler, which
    only notes the signal for `multihost_utils.reached_preemption_sync_point`, is replaced, so that function
    never reports a preemption in a job dsjax started (dsjax stops at its own agreed step instead).
    """
    if backend not in BACKENDS:
        raise JobConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.")
    explicit = [v is not None for v in (coordinator, num_processes, process_id)]
    found = detect(env) if not all(explicit) else ProcessEnv(1, 0)
    if any(explicit):
        if not all(explicit) and not (num_processes == 1 and process_id in (None, 0)):
            raise JobConfigError(
                "initialize() takes coordinator, num_processes and process_id together (or none, to read the "
                f"environment); got coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}."
            )
        n, rank = int(num_processes or 1), int(process_id or 0)
        if n < 1 or not 0 <= rank < n:
            raise JobConfigError(f"process_id={rank} must be in 0..num_processes-1 (num_processes={n}).")
        found = ProcessEnv(n, rank, coordinator=coordinator, source="explicit")
    if _state["env"] is not None:
        if (_state["env"].num_processes, _state["env"].process_id) != (found.num_processes, found.process_id):
            raise JobConfigError(
                f"initialize() was already called as {_state['env'].describe()}; it cannot rejoin as "
                f"{found.describe()}."
            )
        return _state["env"]
    if _client() is not None:  # the user started jax.distributed themselves: adopt it
        _state["env"] = ProcessEnv(jax.process_count(), jax.process_index(), source="jax.distributed")
        return _state["env"]
    from jax._src import xla_bridge

    if backend == "gloo":
        if xla_bridge.backends_are_initialized() and jax.default_backend() != "cpu":
            raise JobConfigError(f"backend='gloo' needs CPU devices, but JAX already runs on {jax.default_backend()}.")
        jax.config.update("jax_platforms", "cpu")
    if found.num_processes > 1:
        if xla_bridge.backends_are_initialized():
            raise JobConfigError(
                f"dsjax.distributed.initialize() was called after JAX started its devices (jax.devices(), an "
                f"array or a jit ran first); as {found.describe()} it must run before any of those. Call it first "
                "thing in the program (python -m dsjax.train does)."
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        timeout = float(os.environ.get("DSJAX_PEER_TIMEOUT", DEFAULT_PEER_TIMEOUT_S))
        timeout = timeout if peer_timeout_s is None else float(peer_timeout_s)
        if timeout <= 0:
            raise JobConfigError(f"the peer timeout must be positive seconds, got {timeout}.")
        if local_device_ids is None:
            local_device_ids = _local_gpus(found, os.environ.get("CUDA_VISIBLE_DEVICES"))
        sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            jax.distributed.initialize(
                found.coordinator,
                found.num_processes,
                found.process_id,
                local_device_ids=local_device_ids,
                cluster_detection_method="deactivate",
                initialization_timeout=init_timeout_s,
                # XLA's own check fires only after ours, which names the process that went missing.
                heartbeat_timeout_seconds=int(timeout) + 30,
            )
        except Exception as err:
            raise DistributedError(
                f"joining the job as {found.describe()} failed: {type(err).__name__}: {err}"
            ) from err
        if sigterm is not None:
            # jax.distributed installs a SIGTERM handler of its own (a preemption notifier for
            # multihost_utils.reached_preemption_sync_point, which dsjax does not use): the signal would only be
            # noted, and the process would run to its end. What was there before stays in charge: until step 0
            # that ends the process, as in a single-process run; from step 0 dsjax's own handler saves and stops
            # (checkpoint.Preemption).
            signal.signal(signal.SIGTERM, sigterm)
        _state["watch"] = PeerWatch(found, timeout)
    _state["env"] = found
    if backend == "nccl" and jax.default_backend() != "gpu":
        raise JobConfigError(f"backend='nccl' needs GPUs, but this process has {jax.default_backend()} devices.")
    return found


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the run's shared files."""
    return jax.process_index() == 0


_syncs: dict[str, int] = {}


def sync(name: str, timeout_s: float = 600.0) -> None:
    """Return once every process has called sync(name) as often as this one (a no-op for one process);
    a DistributedError after `timeout_s` names the barrier. Used around files that process 0 alone writes."""
    if jax.process_count() == 1:
        return
    _syncs[name] = _syncs.get(name, 0) + 1
    key = f"dsjax-{name}-{_syncs[name]}"
    try:
        _client().wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as err:
        raise DistributedError(f"not every process reached {key!r} within {timeout_s:g} s: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Dead peers


class PeerWatch:
    """Exits this process (PEER_LOST_EXIT_CODE, with a message naming the peer) when another process of the
    job stops bumping its liveness counter for `timeout_s`, or posts that it failed."""

    def __init__(self, env: ProcessEnv, timeout_s: float, exit: Callable[[int], None] = os._exit):
        self.env, self.timeout_s, self._exit = env, timeout_s, exit
        self.interval = min(1.0, timeout_s / 5)
        self._beats = 0
        self._stop = threading.Event()
        self._key = f"dsjax/alive/{env.process_id}"
        threading.Thread(target=self._loop, name="dsjax-peer-watch", daemon=True).start()
        atexit.register(self.close)
        previous = sys.excepthook

        def hook(kind, value, tb):  # an uncaught error in a user's script releases the others too
            self.fail(f"{kind.__name__}: {value}")
            previous(kind, value, tb)

        sys.excepthook = hook

    def _post(self, value: str) -> None:
        _client().key_value_set(self._key, value, allow_overwrite=True)

    def fail(self, message: str) -> None:
        """Tell the other processes that this one is ending with an error (they exit, quoting it)."""
        self._stop.set()  # no beat or "exited" may overwrite the report
        with contextlib.suppress(Exception):  # the service is gone already: the others find out without us
            self._post("failed:" + message[:2000])

    def close(self) -> None:
        """A normal exit: the others stop expecting this process's beats."""
        if not self._stop.is_set():
            self._stop.set()
            with contextlib.suppress(Exception):
                self._post("exited")

    def _lost(self, message: str) -> None:
        # on a line of its own: the training loop's progress bar may be half-way through a line on stderr
        print(f"\ndsjax: {message}", file=sys.stderr, flush=True)
        self._exit(PEER_LOST_EXIT_CODE)

    def _loop(self) -> None:
        n, me = self.env.num_processes, self.env.process_id
        last_value: dict[int, str] = {}
        last_change = {p: time.monotonic() for p in range(n) if p != me}
        while not self._stop.is_set():
            try:
                self._beats += 1
                self._post(str(self._beats))
                values = {int(k.rsplit("/", 1)[1]): v for k, v in _client().key_value_dir_get("dsjax/alive/")}
            except Exception as err:
                if self._stop.is_set():
                    return
                self._lost(
                    f"lost the coordination service at {self.env.coordinator} (hosted by process 0): process 0 "
                    f"died or is unreachable ({type(err).__name__}: {str(err).splitlines()[0][:200]}). This "
                    f"process ({me} of {n}) is stopping."
                )
                return
            now = time.monotonic()
            for p in last_change:
                value = values.get(p)
                if value is None:
                    continue  # not started its watch yet: judged from the first beat on
                if value.startswith("failed:"):
                    self._lost(f"process {p} of {n} failed: {value[7:]} This process ({me}) is stopping too.")
                    return
                if value == "exited" or value != last_value.get(p):
                    last_value[p], last_change[p] = value, now
                elif now - last_change[p] > self.timeout_s:
                    self._lost(
                        f"process {p} of {n} has not been heard from for {now - last_change[p]:.0f} s (peer "
                        f"timeout {self.timeout_s:g} s, DSJAX_PEER_TIMEOUT): it died or hangs. This process "
                        f"({me}) is stopping; restart the job (it resumes from its last checkpoint)."
                    )
                    return
            self._stop.wait(self.interval)


def report_failure(message: str) -> None:
    """Tell the other processes that this one is ending with `message` (no-op for a single process)."""
    watch = _state["watch"]
    if watch is not None:
        watch.fail(message)


_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|socket closed|connection refused", re.IGNORECASE
)


def await_lost_peer(err: BaseException) -> None:
    """If `err` looks like a collective that failed because a peer vanished (Gloo reports a closed
    connection without saying whose), wait for the liveness watch to name the missing process and end
    this one (at most the peer timeout); return at once otherwise, or when no peer turns out missing."""
    watch = _state["watch"]
    if watch is None or not _PEER_GONE.search(f"{type(err).__name__} {err}"):
        return
    print(
        f"dsjax: a collective failed ({str(err).splitlines()[0][:200]}); waiting up to {watch.timeout_s:g} s "
        "to learn which process is gone.",
        file=sys.stderr,
        flush=True,
    )
    time.sleep(watch.timeout_s + 3 * watch.interval)


def end_after_failure(code: int, linger_s: float = 2.0) -> None:
    """Leave a multi-process job at once after an error this process already reported: skip JAX's
    shutdown barrier, which would wait for peers that are now stopping themselves. `linger_s` gives their
    watches time to read the report before process 0's coordination service goes away."""
    if _state["watch"] is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        if jax.process_index() == 0:
            time.sleep(linger_s)
        os._exit(code)


# ----------------------------------------------------------------------------------------------------
# Collectives over processes, or over a mesh axis inside jax.shard_map


def _check_op(op: str | None, dtype) -> None:
    """A reduction op must be one of OPS, and 'mean' needs a floating dtype (None: the verb takes no op)."""
    if op is not None and op not in OPS:
        raise JobConfigError(f"op={op!r} is not one of {', '.join(OPS)}.")
    if op == "mean" and not jnp.issubdtype(dtype, jnp.inexact):
        raise JobConfigError(f"op='mean' needs a floating dtype; got {dtype} (use 'sum').")


def _reduce(x, op: str, axis: str):
    return {"sum": jax.lax.psum, "mean": jax.lax.pmean, "max": jax.lax.pmax, "min": jax.lax.pmin}[op](x, axis)


class CommContext:
    """Rank, world size and collectives over the processes of the job (`axis=None`) or over one named
    mesh axis inside `jax.shard_map` (`axis="data"`, say). The verbs mean the same in both:

      all_reduce(x, op)      every member gets op over the members' x (op: sum, mean, max, min)
      all_gather(x)          every member gets the stack of all x: (world, *x.shape), member order
      reduce_scatter(x, op)  op over the members' x, split along dim 0: member r gets chunk r
      broadcast(x, src)      every member gets member src's x
      barrier()              returns once every member has called it (processes only)

    Over processes each member passes a same-shaped array and gets a jax.Array on its first local device;
    the collective runs as an XLA program over one device per process, so it travels over NCCL or Gloo.
    """

    def __init__(self, backend: str = "auto", axis: str | None = None, barrier_timeout_s: float = 300.0):
        if backend not in BACKENDS:
            raise JobConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.")
        self.axis, self.barrier_timeout_s = axis, barrier_timeout_s
        self._barriers = 0
        self._programs: dict = {}
        self._checked: set = set()
        if axis is not None:
            return
        platform = jax.default_backend()
        if backend == "nccl" and platform != "gpu":
            raise JobConfigError(f"backend='nccl' needs GPUs; this process's devices are {platform}.")
        if backend == "gloo" and platform != "cpu":
            raise JobConfigError(f"backend='gloo' runs on CPU devices; this process's devices are {platform}.")
        self.backend = {"gpu": "nccl", "cpu": "gloo"}.get(platform, platform) if backend == "auto" else backend
        firsts = {}
        for d in jax.devices():
            firsts.setdefault(d.process_index, d)
        self.devices = [firsts[p] for p in sorted(firsts)]
        self.mesh = jax.make_mesh(
            (len(self.devices),), ("process",), devices=self.devices, axis_types=(jax.sharding.AxisType.Auto,)
        )
        self.device = self.devices[jax.process_index()]
        self._split = NamedSharding(self.mesh, P("process"))  # the joined input: one block per process

    # -- who am I -------------------------------------------------------------------------------------

    def get_rank(self):
        return jax.lax.axis_index(self.axis) if self.axis else jax.process_index()

    def get_world_size(self):
        return jax.lax.axis_size(self.axis) if self.axis else jax.process_count()

    def get_local_rank(self) -> int:
        if self.axis:
            raise JobConfigError("get_local_rank() is a process notion; a mesh-axis CommContext has no hosts.")
        return process_env().local_rank

    # -- verbs ----------------------------------------------------------------------------------------

    def all_reduce(self, x, op: str = "sum"):
        return self._run("all_reduce", x, op=op)

    def all_gather(self, x):
        return self._run("all_gather", x)

    def reduce_scatter(self, x, op: str = "sum"):
        n = self.get_world_size() if not self.axis else None
        shape = np.shape(x)
        if not shape:
            raise JobConfigError("reduce_scatter needs an array with a leading dimension to split; got a scalar.")
        if n is not None and shape[0] % n:
            raise JobConfigError(
                f"reduce_scatter splits dimension 0 ({shape[0]}) over {n} processes; it must be a multiple of {n}."
            )
        return self._run("reduce_scatter", x, op=op)

    def broadcast(self, x, src: int = 0):
        n = jax.process_count() if not self.axis else None
        if n is not None and not 0 <= src < n:
            raise JobConfigError(f"broadcast src={src} is not a process of this job (0..{n - 1}).")
        return self._run("broadcast", x, src=src)

    def barrier(self, name: str = "") -> None:
        """Wait until every process has called barrier() (the n-th call meets the n-th call elsewhere),
        at most barrier_timeout_s; a DistributedError names the timeout otherwise."""
        if self.axis:
            raise JobConfigError("barrier() synchronises processes; inside shard_map there is nothing to wait for.")
        self._barriers += 1
        if jax.process_count() == 1:
            return
        _sequence["barrier"] += 1  # module-wide: two contexts never reuse a barrier
        key = f"dsjax-barrier-{name}-{_sequence['barrier']}"
        try:
            _client().wait_at_barrier(key, int(self.barrier_timeout_s * 1000))
        except Exception as err:
            raise DistributedError(
                f"barrier {key!r} was not reached by every process within {self.barrier_timeout_s:g} s: {err}"
            ) from err

    # -- the programs ---------------------------------------------------------------------------------

    @staticmethod
    def _body(verb: str, axis: str, op: str | None, src: int | None):
        """The per-member computation of `verb`, on that member's block."""

        def body(x):
            if x.dtype == jnp.bool_ and verb in ("all_reduce", "reduce_scatter"):
                out = reduce(x.astype(jnp.int32))  # sum: how many are True; max/min: any/all
                return out if op == "sum" else out.astype(jnp.bool_)
            return reduce(x)

        def reduce(x):
            if verb == "all_reduce":
                return _reduce(x, op, axis)
            if verb == "all_gather":
                return jax.lax.all_gather(x, axis)
            if verb == "reduce_scatter":
                if op in ("sum", "mean"):
                    out = jax.lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)
                    return out / jax.lax.axis_size(axis) if op == "mean" else out
                full = _reduce(x, op, axis)
                chunk = x.shape[0] // jax.lax.axis_size(axis)
                return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axis) * chunk, chunk)
            # broadcast: only src contributes, a sum then carries its value to everyone
            mine = jax.lax.axis_index(axis) == src
            if x.dtype == jnp.bool_:
                return jax.lax.psum(jnp.where(mine, x, False).astype(jnp.int32), axis).astype(jnp.bool_)
            return jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), axis)

        return body

    def _run(self, verb: str, x, op: str | None = None, src: int | None = None):
        if not isinstance(x, jax.Array):  # a jax.Array or tracer as it is; a host value onto the default device
            x = jnp.asarray(x)
        if self.axis:
            _check_op(op, x.dtype)
            if verb == "reduce_scatter" and x.shape[0] % jax.lax.axis_size(self.axis):
                raise JobConfigError(
                    f"reduce_scatter splits dimension 0 ({x.shape[0]}) over mesh axis {self.axis!r} of size "
                    f"{jax.lax.axis_size(self.axis)}; it must be a multiple of it."
                )
            return self._body(verb, self.axis, op, src)(x)
        key = (verb, op, src, x.shape, x.dtype)
        program = self._programs.get(key)
        if program is None:  # first call of this signature: check it, agree on it, build its program
            _check_op(op, x.dtype)
            self._agree(verb, x, op, src)
            body = self._body(verb, "process", op, src)
            program = self._programs[key] = jax.jit(
                jax.shard_map(
                    body,
                    mesh=self.mesh,
                    in_specs=P("process"),
                    out_specs=P("process") if verb == "reduce_scatter" else P(),
                    check_vma=False,  # all_gather's result is the same everywhere, which vma typing cannot see
                )
            )
        n, scalar = len(self.devices), x.ndim == 0
        x = x.reshape(1) if scalar else x
        # The processes' arrays, end to end along dim 0, form one global array: no copy of x is made.
        local = x if x.devices() == {self.device} else jax.device_put(x, self.device)
        joined = jax.make_array_from_single_device_arrays((n * x.shape[0], *x.shape[1:]), self._split, [local])
        block = program(joined).addressable_data(0)
        if scalar:
            return block.reshape(n) if verb == "all_gather" else block.reshape(())
        return block

    def _agree(self, verb: str, x, op: str | None, src: int | None) -> None:
        """The first time this process runs a given (verb, shape, dtype, op, src), check that every other
        process runs the same one; a mismatch would otherwise hang or corrupt the collective. Later calls
        of a signature are not checked (that would cost a round trip to the coordinator per collective):
        a process that repeats a known signature while another runs a new one is caught on the other
        side, which times out after barrier_timeout_s naming the process."""
        n = jax.process_count()
        signature = f"{verb}(shape={tuple(x.shape)}, dtype={x.dtype}, op={op}, src={src})"
        if n == 1 or signature in self._checked:
            return
        client = _client()
        _sequence["agree"] += 1  # module-wide, and advanced even when this check fails
        tag = f"dsjax/comm/{_sequence['agree']}"
        client.key_value_set(f"{tag}/{jax.process_index()}", signature, allow_overwrite=True)
        theirs = {}
        for p in range(n):
            try:
                theirs[p] = client.blocking_key_value_get(f"{tag}/{p}", int(self.barrier_timeout_s * 1000))
            except Exception as err:
                raise DistributedError(
                    f"process {p} did not reach the collective {signature} within {self.barrier_timeout_s:g} s: {err}"
                ) from err
        differ = {p: s for p, s in theirs.items() if s != signature}
        if differ:
            listed = "; ".join(f"process {p}: {s}" for p, s in differ.items())
            raise DistributedError(
                f"processes disagree on a collective: process {jax.process_index()} calls {signature}, but {listed}."
            )
        self._checked.add(signature)
