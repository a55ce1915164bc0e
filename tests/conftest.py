"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in tests (subprocesses inherit this): each test compiles what it runs,
# as on a fresh machine. tests/test_distributed.py switches it on where it is the subject.
os.environ["DSJAX_COMPILATION_CACHE"] = "off"

import jax

jax.config.update("jax_num_cpu_devices", 8)
