"""`dsjax.jit` (the seed's `@ds.jit`) and the persistent compilation cache.

`dsjax.jit` is `jax.jit` plus what a long training job wants to know about compiling:

- shardings given as PartitionSpecs bind to the active mesh (`jax.set_mesh`), with a clear error when
  none is active; arguments without a sharding keep their own, as with jax.jit;
- each compile is logged once, with its wall time and whether the persistent cache served it;
- a function that compiles more than `max_recompiles` times after its first compile (shapes or static
  arguments that keep changing: the classic silent slowdown) draws a warning naming the new signature;
- the persistent compilation cache is switched on at the first call, so a second process start loads
  its programs from disk: directory DSJAX_COMPILATION_CACHE (default ~/.cache/dsjax/xla), off with
  DSJAX_COMPILATION_CACHE=off, or call `compilation_cache(...)` yourself before the first `dsjax.jit` call
  (after `simulate_cpu_devices` or `jax.distributed` set the devices up). dsjax leaves it off where JAX runs
  on several CPU devices (simulated devices, or CPU processes of a job): there a program with collectives
  that XLA loads back from the cache can deadlock (below).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
from jax.sharding import PartitionSpec

from dsjax.config import ConfigError

logger = logging.getLogger("dsjax")
if not logger.handlers:  # visible by default (notebooks, scripts); configure the "dsjax" logger to change it
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
DEFAULT_CACHE = Path("~/.cache/dsjax/xla")
_cache: dict = {"configured": False, "dir": None}
_hits = threading.local()  # per thread: a compile in another thread (a background warm-up) is not ours


def _count_hit(event: str, **_kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits.count = getattr(_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


# Measured with jaxlib 0.10.2 on 8 simulated CPU devices (experiments/RESULTS.md, 2026-11-29): the 1F1B
# train step (data 2 x pipeline 2 x fsdp 2) loaded back from the persistent cache deadlocked in 3 of 4 runs,
# with 24 of its 32 XLA threads idle (one device in an all-gather and a collective-permute at once, others in
# the permute only, one device in neither), and never when compiled afresh (4 of 4 runs).
CPU_CACHE_OFF = (
    "compilation cache: off on {n} CPU devices (XLA's CPU programs with collectives can deadlock when loaded "
    "back from the cache); each run compiles afresh"
)
CPU_CACHE_KEPT = (
    "compilation cache: JAX's cache at {dir}, which you set, stays on with {n} CPU devices, but XLA's CPU "
    "programs with collectives can deadlock when loaded back from it; unset it if a run hangs"
)


def _several_cpu_devices() -> int:
    """The device count where JAX runs on more than one CPU device, else 0."""
    return jax.device_count() if jax.default_backend() == "cpu" and jax.device_count() > 1 else 0


def compilation_cache(directory: str | Path | None = None, min_compile_time_s: float = 0.5) -> Path | None:
    """Switch JAX's persistent compilation cache on at `directory` (default: DSJAX_COMPILATION_CACHE or
    ~/.cache/dsjax/xla; "off" or "" there turns it off) for programs that take at least
    `min_compile_time_s` to compile. Returns the directory in use, None when off. Idempotent.

    On several CPU devices dsjax's cache stays off (see CPU_CACHE_OFF); a cache the user set for JAX itself
    is kept, with a warning. Unless `directory` is off, this counts the devices, which starts JAX's
    backends: call it after `simulate_cpu_devices` or `jax.distributed.initialize`."""
    if directory is None:
        directory = os.environ.get("DSJAX_COMPILATION_CACHE", str(DEFAULT_CACHE))
    _cache["configured"] = True
    if str(directory).lower() in ("", "off", "0", "false", "none"):
        _cache["dir"] = None
        return None
    if n := _several_cpu_devices():
        theirs = jax.config.jax_compilation_cache_dir
        if theirs is None:
            if jax.process_index() == 0:
                logger.info(CPU_CACHE_OFF.format(n=n))
            _cache["dir"] = None
            return None
        logger.warning(CPU_CACHE_KEPT.format(n=n, dir=theirs))
        _cache["dir"] = Path(theirs)
        return _cache["dir"]
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"the compilation cache directory {path} cannot be created ({err}); set DSJAX_COMPILATION_CACHE "
            "to a writable directory, or to off."
        ) from None
    if jax.config.jax_compilation_cache_dir not in (None, str(path)):
        _cache["dir"] = Path(jax.config.jax_compilation_cache_dir)  # the user set JAX's own: keep it
        return _cache["dir"]
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    _cache["dir"] = path
    return path


def cache_hits() -> int:
    """Programs this thread has loaded from the persistent compilation cache so far."""
    return getattr(_hits, "count", 0)


def _has_spec(tree) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return any(isinstance(x, PartitionSpec) for x in leaves)


def _signature(x) -> str:
    return f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"


class Jitted:
    """What dsjax.jit returns: call it like the function; `.compiles` counts its compiles, `.lower` and
    `.trace` are jax.jit's."""

    def __init__(self, fun: Callable, name: str, max_recompiles: int, log: Callable[[str], None], **jit_kwargs):
        self.name, self.max_recompiles, self.log = name, max_recompiles, log
        self.compiles, self._traces, self._warned = 0, 0, False
        self._specs = _has_spec(jit_kwargs.get("in_shardings")) or _has_spec(jit_kwargs.get("out_shardings"))

        @functools.wraps(fun)
        def traced(*args, **kwargs):
            self._traces += 1  # runs only when jax.jit traces: a new signature, hence a compile
            return fun(*args, **kwargs)

        self._jitted = jax.jit(traced, **jit_kwargs)
        functools.update_wrapper(self, fun)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self._jitted.trace(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not _cache["configured"]:
            compilation_cache()
        if self._specs and jax.sharding.get_abstract_mesh().empty:
            raise ConfigError(
                f"dsjax.jit({self.name}) was given PartitionSpec shardings but no mesh is active; run it inside "
                "`with jax.set_mesh(mesh):` (or pass NamedShardings)."
            )
        traces, hits, start = self._traces, cache_hits(), time.perf_counter()
        out = self._jitted(*args, **kwargs)
        if self._traces != traces:
            self._compiled(time.perf_counter() - start, cache_hits() != hits, args, kwargs)
        return out

    def _compiled(self, seconds: float, from_cache: bool, args, kwargs) -> None:
        self.compiles += 1
        how = "loaded from the persistent compilation cache" if from_cache else "compiled"
        which = "" if self.compiles == 1 else f" (compile #{self.compiles})"
        self.log(f"dsjax.jit: {self.name} {how} in {seconds:.2f} s{which}")
        if self.compiles > self.max_recompiles + 1 and not self._warned:
            self._warned = True
            shapes = jax.tree.map(_signature, (args, kwargs))
            warnings.warn(
                f"dsjax.jit: {self.name} has compiled {self.compiles} times, more than its first compile plus "
                f"max_recompiles={self.max_recompiles} recompiles; its argument shapes, dtypes or static "
                f"arguments keep changing (latest: {shapes}). Pad to fixed shapes, or mark the varying "
                "argument static only if it takes few values.",
                RuntimeWarning,
                stacklevel=3,
            )


def jit(
    fun: Callable | None = None,
    *,
    in_shardings=None,
    out_shardings=None,
    static_argnums=(),
    static_argnames=(),
    donate_argnums=(),
    max_recompiles: int = 8,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
):
    """`jax.jit` with the active mesh's shardings, compile logging, a recompile warning and the persistent
    compilation cache (module docstring). Use as `@dsjax.jit` or `@dsjax.jit(donate_argnums=0, ...)`."""
    if max_recompiles < 0:
        raise ConfigError(f"dsjax.jit: max_recompiles must be 0 or more, got {max_recompiles}.")

    def wrap(f: Callable) -> Jitted:
        kwargs = dict(static_argnums=static_argnums, static_argnames=static_argnames, donate_argnums=donate_argnums)
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        label = name or getattr(f, "__qualname__", None) or repr(f)
        return Jitted(f, label, max_recompiles, log or logger.info, **kwargs)

    return wrap if fun is None else wrap(fun)
