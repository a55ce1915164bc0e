"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# dsjax's own cache switch stays off (tests/test_distributed.py switches it on where it is the subject).
os.environ["DSJAX_COMPILATION_CACHE"] = "off"
# No persistent compilation cache: on several simulated devices a program with collectives that XLA loads
# back from the cache can deadlock (dsjax/compiling.py, CPU_CACHE_OFF), so every test compiles afresh.

import jax

from dsjax.jobenv import cpu_thread_env

os.environ.update(cpu_thread_env(8))  # the threads 8 devices' collectives need; subprocesses inherit it
jax.config.update("jax_num_cpu_devices", 8)
