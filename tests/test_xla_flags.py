"""dsjax's XLA flag allow-list: the installed jaxlib has an entry, XLA parses every flag of it (an unknown
flag aborts the process, so each check runs in a subprocess), and the user's XLA_FLAGS win."""

import os
import subprocess
import sys

import jaxlib
import pytest

from dsjax import xla_flags

PROBE = "import jax; jax.numpy.zeros(1).block_until_ready(); print('parsed')"


def parses(flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_the_installed_jaxlib_has_a_validated_entry():
    assert xla_flags.recommended() is not None, (
        f"jaxlib {jaxlib.__version__} has no entry in dsjax.xla_flags.FLAGS: measure the candidate flags on a GPU "
        "and add one (an empty entry means none helped)"
    )


def test_every_flag_of_the_installed_entry_parses():
    flags = xla_flags.merge("", xla_flags.recommended() or {})
    result = parses(flags)
    assert result.returncode == 0 and "parsed" in result.stdout, result.stderr[-2000:]


def test_the_parse_check_catches_an_unknown_flag():
    # the control for the test above: XLA aborts on a flag it does not know
    result = parses("--xla_dsjax_no_such_flag=true")
    assert result.returncode != 0
    assert "Unknown flag" in result.stderr


def test_every_entry_is_keyed_by_major_minor():
    for key in xla_flags.FLAGS:
        assert xla_flags.version_key(key + ".0") == key


def test_merge_keeps_the_users_settings():
    merged = xla_flags.merge("--xla_gpu_enable_triton_gemm=true", {"xla_gpu_enable_triton_gemm": "false", "xla_b": "1"})
    assert merged == "--xla_gpu_enable_triton_gemm=true --xla_b=1"
    assert xla_flags.merge("", {}) == ""


def test_apply_after_backend_initialisation_changes_nothing(monkeypatch):
    import jax

    jax.devices()  # backends are up in this process
    monkeypatch.setattr(xla_flags, "FLAGS", {xla_flags.version_key(): {"xla_test_flag": "7"}})
    environ = {"XLA_FLAGS": "--xla_x=1"}
    message = xla_flags.apply(environ)
    assert environ == {"XLA_FLAGS": "--xla_x=1"}
    assert "already initialised" in message


@pytest.mark.parametrize("known", [True, False])
def test_apply_before_initialisation_sets_the_entry(monkeypatch, known):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(xla_flags, "FLAGS", {xla_flags.version_key(): {"xla_test_flag": "7"}} if known else {})
    environ = {"XLA_FLAGS": "--xla_user=1"}
    message = xla_flags.apply(environ)
    if known:
        assert environ["XLA_FLAGS"] == "--xla_user=1 --xla_test_flag=7"
        assert message == "XLA flags: --xla_user=1 --xla_test_flag=7"
    else:
        assert environ["XLA_FLAGS"] == "--xla_user=1"
        assert "no validated entry" in message


def test_an_empty_entry_sets_nothing_and_says_nothing(monkeypatch):
    monkeypatch.setattr(xla_flags, "FLAGS", {xla_flags.version_key(): {}})
    environ = {}
    assert xla_flags.apply(environ) == "" and environ == {}


def test_the_memory_fraction_default_yields_to_the_user_and_to_a_running_backend(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    environ = {}
    xla_flags.default_memory_fraction(environ)
    assert environ == {"XLA_PYTHON_CLIENT_MEM_FRACTION": xla_flags.MEM_FRACTION}
    environ = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}
    xla_flags.default_memory_fraction(environ)
    assert environ == {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    environ = {}
    xla_flags.default_memory_fraction(environ)
    assert environ == {}
