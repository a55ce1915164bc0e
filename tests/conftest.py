"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends, and one persistent
compilation cache for the whole session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# dsjax's own cache switch stays off (tests/test_distributed.py switches it on where it is the subject).
os.environ["DSJAX_COMPILATION_CACHE"] = "off"
# JAX's persistent cache, fresh for each session and shared by its processes (pytest-xdist workers and the
# subprocesses inherit the variables): the many tests that build the same small model compile its programs
# once per session instead of once per test. A program is the same executable either way; the first test
# that needs it still compiles it, as on a fresh machine.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dsjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax

from dsjax.jobenv import cpu_thread_env

os.environ.update(cpu_thread_env(8))  # the threads 8 devices' collectives need; subprocesses inherit it
jax.config.update("jax_num_cpu_devices", 8)
