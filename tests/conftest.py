"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends, and one persistent
compilation cache for the whole session."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# dsjax's own cache switch stays off (tests/test_distributed.py switches it on where it is the subject).
os.environ["DSJAX_COMPILATION_CACHE"] = "off"
# JAX's persistent cache, fresh for each session and shared by its processes (pytest-xdist workers and the
# subprocesses inherit the variables): the many tests that build the same small model compile its programs
# once per session instead of once per test; the first test that needs a program still compiles it, as on a
# fresh machine. Except for pipeline programs: loaded back from the cache, a 1F1B step on 8 simulated devices
# deadlocked in its collectives (dsjax/compiling.py, CPU_CACHE_OFF), so the modules that run pipelined
# steps compile them afresh (the `no_compilation_cache` fixture below).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dsjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite's time is mostly XLA compiling many small programs for the CPU, and most of that is LLVM
# optimising the generated code, which these tiny models do not need: -O0 compiles the pipeline tests'
# programs in about half the time. It changes how fast the code runs, not what it computes (no fast-math
# either way); the processes some tests start inherit it unless they set XLA_FLAGS themselves.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

import jax

from dsjax.jobenv import cpu_thread_env

os.environ.update(cpu_thread_env(8))  # the threads 8 devices' collectives need; subprocesses inherit it
jax.config.update("jax_num_cpu_devices", 8)
if jax.default_backend() == "gpu":
    # The kernel tests also run on GPUs (tests/training.py, ON_GPU). Their fp32 tolerances assume fp32 GEMMs,
    # which XLA runs in TF32 on GPUs by default (about 1e-3 relative apart).
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def no_compilation_cache():
    """No persistent compilation cache for the module's programs (JAX decides at its next compile)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    cc.reset_cache()
