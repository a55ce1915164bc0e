"""dsjax.distributed in one process: reading the job from the environment, start-up errors, CommContext
with one process and its verbs inside shard_map over a simulated mesh, and dsjax.jit.
Real multi-process jobs are in tests/test_multiprocess.py."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dsjax as ds
from dsjax import distributed as dd
from dsjax import jobenv, launch

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


# ----------------------------------------------------------------------------------------------------
# Reading the environment


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, dd.ProcessEnv(1, 0)),
        (TORCHRUN, dd.ProcessEnv(4, 2, 0, 1, "10.0.0.1:29500", "torchrun")),
        (
            {**TORCHRUN, "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"},
            dd.ProcessEnv(4, 2, 1, 2, "10.0.0.1:29500", "torchrun"),
        ),
        (
            {"JOB_COMPLETION_INDEX": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "job-0.svc", "MASTER_PORT": "1234"},
            dd.ProcessEnv(8, 3, 0, 1, "job-0.svc:1234", "kubernetes"),
        ),
        (
            {
                "SLURM_JOB_ID": "4242",
                "SLURM_STEP_NUM_TASKS": "16",
                "SLURM_PROCID": "9",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
                "SLURM_STEP_NODELIST": "gpu[007-008,011]",
            },
            dd.ProcessEnv(16, 9, 1, 8, f"gpu007:{jobenv.DEFAULT_PORT + 242}", "slurm"),
        ),
        (
            {
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "MASTER_ADDR": "head",
                "MASTER_PORT": "5000",
            },
            dd.ProcessEnv(2, 1, 1, 2, "head:5000", "openmpi"),
        ),
        # a batch script's own step (no srun) is one process, whatever --ntasks the job asked for
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, dd.ProcessEnv(1, 0)),
    ],
    ids=["none", "torchrun", "torchrun-local", "kubernetes", "slurm", "openmpi", "slurm-batch-step"],
)
def test_detect_reads_each_convention(env, want):
    assert dd.detect(env) == want


@pytest.mark.parametrize(
    "local_rank, local_n, visible, want",
    [
        (0, 1, None, None),  # alone on its host: every GPU
        (2, 4, None, [2]),  # several per host, nothing restricts: one GPU each
        (1, 2, "0", None),  # a launcher or --gpus-per-task gave it its own already
        (1, 2, "0,1,2,3", [2, 3]),  # the host's 4 GPUs listed to both (SLURM --gres): its half
    ],
)
def test_each_process_takes_its_share_of_the_hosts_gpus(local_rank, local_n, visible, want):
    assert dd._local_gpus(dd.ProcessEnv(8, 0, local_rank, local_n), visible) == want


@pytest.mark.parametrize(
    "env, words",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, ["MASTER_ADDR", "MASTER_PORT"]),
        ({**TORCHRUN, "RANK": "4"}, ["rank 4", "0..3"]),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, ["WORLD_SIZE='two'", "integer"]),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, ["70000", "1..65535"]),
        (
            {**TORCHRUN, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n1"},
            ["two different jobs", "torchrun", "slurm"],
        ),
        (
            {"JOB_COMPLETION_INDEX": "1", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            ["RANK=0", "JOB_COMPLETION_INDEX=1"],
        ),
        ({"JOB_COMPLETION_INDEX": "1"}, ["Kubernetes", "WORLD_SIZE"]),
        ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}, ["SLURM_STEP_NODELIST"]),
    ],
    ids=["missing", "rank-range", "not-int", "port", "two-jobs", "k8s-rank", "k8s-missing", "slurm-nodes"],
)
def test_inconsistent_environments_are_named(env, words):
    with pytest.raises(dd.DistributedError) as err:
        dd.detect(env)
    for word in words:
        assert word in str(err.value)


def test_first_slurm_host():
    assert jobenv.first_slurm_host("node17") == "node17"
    assert jobenv.first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert jobenv.first_slurm_host("a-b[10,12]") == "a-b10"


def test_initialize_after_jax_started_is_an_error(monkeypatch):
    monkeypatch.setattr(dd, "_state", {"env": None, "watch": None})  # as if no earlier test had called it
    jax.devices()  # JAX's backends are up in this test process
    with pytest.raises(dd.DistributedError, match="after JAX started its devices"):
        dd.initialize("127.0.0.1:1", 2, 0)
    with pytest.raises(dd.DistributedError, match="backend='mpi'"):
        dd.initialize(backend="mpi")
    with pytest.raises(dd.DistributedError, match="together"):
        dd.initialize(coordinator="127.0.0.1:1")
    with pytest.raises(dd.DistributedError, match="after JAX started"):  # explicit arguments win over the env
        dd.initialize("127.0.0.1:1", 2, 1, env={"WORLD_SIZE": "3", "RANK": "9"})
    assert dd.initialize(env={}) == dd.ProcessEnv(1, 0)  # a single process needs no coordinator
    with pytest.raises(dd.DistributedError, match="needs GPUs"):
        dd.CommContext(backend="nccl")


# ----------------------------------------------------------------------------------------------------
# CommContext with one process, and inside shard_map


def test_one_process_comm_context_is_the_identity_with_checks():
    comm = ds.CommContext()
    assert (comm.get_rank(), comm.get_world_size(), comm.get_local_rank(), comm.backend) == (0, 1, 0, "gloo")
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    for op in dd.OPS:
        np.testing.assert_array_equal(comm.all_reduce(x, op), x)
        np.testing.assert_array_equal(comm.reduce_scatter(x, op), x)
    np.testing.assert_array_equal(comm.all_gather(x), x[None])
    np.testing.assert_array_equal(comm.broadcast(x, 0), x)
    comm.barrier()
    with pytest.raises(dd.DistributedError, match="op='prod'"):
        comm.all_reduce(x, "prod")
    with pytest.raises(dd.DistributedError, match="floating dtype"):
        comm.all_reduce(np.arange(3), "mean")
    with pytest.raises(dd.DistributedError, match="src=1"):
        comm.broadcast(x, 1)
    with pytest.raises(dd.DistributedError, match="scalar"):
        comm.reduce_scatter(np.float32(1.0))
    flags = np.array([True, False, True])
    np.testing.assert_array_equal(comm.all_reduce(flags, "sum"), [1, 0, 1])  # a count
    assert comm.all_reduce(flags, "max").dtype == bool
    assert float(comm.all_reduce(np.float32(2.5))) == 2.5 and comm.all_gather(np.float32(2.5)).shape == (1,)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.bfloat16])
def test_verbs_inside_shard_map_match_numpy(dtype):
    """The same verbs over a mesh axis of 4 simulated devices (another axis of 2 left alone)."""
    mesh = jax.make_mesh((2, 4), ("other", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    comm = ds.CommContext(axis="data")
    x = (np.arange(2 * 4 * 8 * 3) % 11 - 4).reshape(2, 4, 8, 3).astype(np.float32)  # (other, data, 8, 3)
    ops = [op for op in dd.OPS if not (op == "mean" and dtype == jnp.int32)]

    def body(block):  # block: (1, 1, 8, 3)
        v = block[0, 0]
        out = {"rank": jnp.full((1, 1), comm.get_rank()), "size": jnp.full((1, 1), comm.get_world_size())}
        for op in ops:
            out[f"all_reduce_{op}"] = comm.all_reduce(v, op)[None, None]
            out[f"reduce_scatter_{op}"] = comm.reduce_scatter(v, op)[None, None]
        out["all_gather"] = comm.all_gather(v)[None, None]
        out["broadcast"] = comm.broadcast(v, 2)[None, None]
        return out

    spec = P("other", "data")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    with jax.set_mesh(mesh):
        got = jax.device_get(f(jnp.asarray(x, dtype)))
    v = np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_array_equal(got["rank"], np.broadcast_to(np.arange(4), (2, 4)))
    np.testing.assert_array_equal(got["size"], 4)
    reducers = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}
    for op in ops:
        full = reducers[op](v, axis=1)  # (other, 8, 3)
        want = np.broadcast_to(full[:, None], v.shape)
        np.testing.assert_allclose(got[f"all_reduce_{op}"].astype(np.float64), want, rtol=tol, atol=tol)
        chunks = full.reshape(2, 4, 2, 3)  # member r gets rows 2r, 2r+1
        np.testing.assert_allclose(got[f"reduce_scatter_{op}"].astype(np.float64), chunks, rtol=tol, atol=tol)
    np.testing.assert_array_equal(got["all_gather"].astype(np.float64), np.broadcast_to(v[:, None], (2, 4, 4, 8, 3)))
    np.testing.assert_array_equal(got["broadcast"].astype(np.float64), np.broadcast_to(v[:, 2:3], v.shape))


def test_axis_reduce_scatter_needs_a_divisible_dimension():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    comm = ds.CommContext(axis="data")
    f = jax.shard_map(lambda b: comm.reduce_scatter(b[0])[None], mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(dd.DistributedError, match=r"dimension 0 \(6\).*size 8"):
        jax.jit(f)(jnp.zeros((8, 6)))


# ----------------------------------------------------------------------------------------------------
# dsjax.jit


def test_jit_compiles_once_per_signature_logs_and_warns(caplog):
    logged: list[str] = []

    @ds.jit(max_recompiles=1, log=logged.append)
    def f(x, scale):
        return (x * scale).sum()

    for _ in range(3):
        assert float(f(jnp.ones(4), 2.0)) == 8.0
    assert f.compiles == 1 and len(logged) == 1 and "f compiled in" in logged[0]
    f(jnp.ones(5), 2.0)
    assert f.compiles == 2 and "(compile #2)" in logged[-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(jnp.ones(6), 2.0)
        f(jnp.ones(7), 2.0)
    assert len([w for w in caught if "has compiled 3 times" in str(w.message)]) == 1  # warned once
    assert f.compiles == 4


def test_jit_binds_partition_specs_to_the_active_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    g = ds.jit(lambda x: x * 2, in_shardings=P("data"), out_shardings=P("data"), log=lambda _: None)
    with pytest.raises(ds.ConfigError, match="no mesh is active"):
        g(jnp.ones(16))
    with jax.set_mesh(mesh):
        out = g(np.ones(16, np.float32))  # a host array: jit lays it out as in_shardings says
    assert out.sharding.spec == P("data") and len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(out, 2 * np.ones(16))


def test_jit_default_log_goes_to_the_dsjax_logger(caplog):
    h = ds.jit(lambda x: x + 1, name="h")
    with caplog.at_level(logging.INFO, logger="dsjax"):
        logging.getLogger("dsjax").propagate = True
        try:
            h(jnp.ones(3))
        finally:
            logging.getLogger("dsjax").propagate = False
    assert any("h compiled in" in r.getMessage() for r in caplog.records)


CACHE_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
import dsjax as ds
ds.compilation_cache(sys.argv[1], min_compile_time_s=0)
times = []
@ds.jit(log=lambda m: times.append(m))
def deep(x):
    for i in range(300):  # unrolled: a program that takes a while to compile
        x = jnp.tanh(x @ x.T + i) @ x
    return x
deep(jnp.ones((8, 8)))
print("compile", times[0].split(" in ")[1].split(" s")[0], ds.compiling.cache_hits(), flush=True)
"""


def test_a_second_process_loads_from_the_persistent_cache(tmp_path):
    script = tmp_path / "cache.py"
    script.write_text(CACHE_SCRIPT)
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "xla")],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},  # the session's cache
        )
        assert out.returncode == 0, out.stderr[-2000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("compile"))
        runs.append((float(line.split()[1]), int(line.split()[2])))
    (cold, cold_hits), (warm, warm_hits) = runs
    assert cold_hits == 0 and warm_hits >= 1
    assert warm < 0.5 * cold, runs
    assert any((tmp_path / "xla").iterdir())


def test_dsjax_leaves_its_cache_off_on_several_cpu_devices(tmp_path, caplog, monkeypatch):
    """On this session's 8 CPU devices compilation_cache() does not switch its cache on, says why and
    creates no directory; a cache the user set for JAX itself is kept, with a warning that names it."""
    from dsjax import compiling

    theirs = jax.config.jax_compilation_cache_dir
    messages = []
    try:
        for jax_dir in (None, str(tmp_path / "theirs")):
            jax.config.update("jax_compilation_cache_dir", jax_dir)
            monkeypatch.setitem(compiling._cache, "configured", False)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="dsjax"):
                logging.getLogger("dsjax").propagate = True
                try:
                    got = ds.compilation_cache(tmp_path / "xla")
                finally:
                    logging.getLogger("dsjax").propagate = False
            assert got == (None if jax_dir is None else Path(jax_dir))
            messages.append(" ".join(r.getMessage() for r in caplog.records))
    finally:
        jax.config.update("jax_compilation_cache_dir", theirs)
    assert not (tmp_path / "xla").exists()
    assert "compilation cache: off on 8 CPU devices" in messages[0]
    assert f"JAX's cache at {tmp_path / 'theirs'}, which you set, stays on with 8 CPU devices" in messages[1]


# ----------------------------------------------------------------------------------------------------
# The launcher's flags


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--nproc=0"], ["--nproc", "at least 1"]),
        (["--nproc=2", "--min-nproc=3"], ["--min-nproc=3", "--nproc=2"]),
        (["--nproc=2", "--max-restarts=-1"], ["--max-restarts"]),
        (["--nproc=2", "--cpu-devices-per-proc=0"], ["--cpu-devices-per-proc"]),
        (["--nproc=4", "--cpu-devices-per-proc=200"], ["--nproc=4", "--cpu-devices-per-proc=200", "800", "512"]),
        (["--nproc=2", "--preset=tiny"], ["unknown launcher flag(s) --preset=tiny", "go after `--`"]),
        (["--nproc=2", "--cpu-devices-per-proc=1", "--gpus-per-proc=1"], ["exclude each other"]),
        (["--nproc=2", "--cpu-devices-per-proc=2", "--", "--cpu-devices=4"], ["--cpu-devices after `--`"]),
        (["--nproc=4", "--", "--cpu-devices=200"], ["--cpu-devices after `--`", "--cpu-devices-per-proc"]),
        (["--nproc=2", "--cpu-devices=4"], ["unknown launcher flag(s) --cpu-devices=4"]),  # not an abbreviation
        (["--nproc=2", "--run=missing.py"], ["--run=missing.py: there is no such script"]),
        (["--nproc=2", "--run=no_such_module.train"], ["--run=no_such_module.train: no module of that name"]),
    ],
)
def test_launcher_flags_are_checked(argv, words):
    with pytest.raises(launch.LaunchError) as err:
        launch.parse(argv)
    for word in words:
        assert word in str(err.value)


def test_launcher_gives_train_one_run_directory_and_the_env_contract(monkeypatch):
    args, rest = launch.parse(["--nproc=3", "--cpu-devices-per-proc=2", "--", "--preset=tiny"])
    assert rest[0] == "--preset=tiny" and rest[1].startswith("--out=runs/")
    monkeypatch.setenv("SLURM_PROCID", "5")  # the launcher itself running as one SLURM task
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    envs = launch.process_envs(args, 3, 12345, attempt=1)
    for rank, env in enumerate(envs):
        assert dd.detect(env) == dd.ProcessEnv(3, rank, rank, 3, "127.0.0.1:12345", "torchrun")
        assert (env["JAX_NUM_CPU_DEVICES"], env["JAX_PLATFORMS"], env["DSJAX_RESTART"]) == ("2", "cpu", "1")


def test_simulated_devices_get_the_threads_their_collectives_need(monkeypatch):
    """The launcher's processes get CPU_THREADS_PER_DEVICE threads per simulated device (the core count if
    larger), and a user's PJRT_NPROC or NPROC stands."""
    args, _ = launch.parse(["--nproc=2", "--cpu-devices-per-proc=3", "--", "--preset=tiny"])
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    monkeypatch.delenv("NPROC", raising=False)
    want = str(max(len(os.sched_getaffinity(0)), 3 * jobenv.CPU_THREADS_PER_DEVICE))
    assert [env["PJRT_NPROC"] for env in launch.process_envs(args, 2, 12345, attempt=0)] == [want, want]
    monkeypatch.setenv("PJRT_NPROC", "5")
    assert [env["PJRT_NPROC"] for env in launch.process_envs(args, 2, 12345, attempt=0)] == ["5", "5"]
    monkeypatch.delenv("PJRT_NPROC")
    monkeypatch.setenv("NPROC", "6")  # XLA's other name for it
    assert ["PJRT_NPROC" in env for env in launch.process_envs(args, 2, 12345, attempt=0)] == [False, False]


# Collectives that can run side by side, as in the 1F1B step: an all-gather in a loop beside a chain of
# permutes. With XLA's default pool (max(cores, devices) threads) every thread can end up waiting in a
# collective for a device that has no thread left; on a 2-core machine this program deadlocked in every one
# of 4 runs of 200 calls (and in 2 of 6 runs of 50), until XLA's rendezvous timeout aborted the process.
SIDE_BY_SIDE = """
import glob
import sys
import jax
from jax.sharding import Mesh, PartitionSpec as P
from dsjax.mesh import simulate_cpu_devices

simulate_cpu_devices(8)
mesh = Mesh(jax.devices(), ("x",))
ring = [(i, (i + 1) % 8) for i in range(8)]

def step(a, b):
    a = jax.lax.fori_loop(0, 20, lambda i, c: c + 1e-3 * jax.lax.all_gather(c, "x").sum(0), a)
    return a, jax.lax.ppermute(2 * jax.lax.ppermute(b, "x", ring), "x", ring)

step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x"))))
a = b = jax.numpy.ones((8 * 64, 64))
for _ in range(int(sys.argv[1])):
    a, b = step(a, b)
jax.block_until_ready((a, b))
names = [open(task).read().strip() for task in glob.glob("/proc/self/task/*/comm")]
print("finished; XLA threads:", names.count("tf_XLAEigen"))
"""


def test_collectives_side_by_side_on_simulated_devices_do_not_deadlock(tmp_path):
    """500 calls of SIDE_BY_SIDE after simulate_cpu_devices(8) finish, on a pool of at least 4 threads per
    device. A deadlock aborts the process after XLA's rendezvous timeout, set to 20 s here (40 s by
    default). On the 2-core machine where it was written, with XLA's default pool (8 threads) its first form
    (the same program and calls, before the thread count was added and the compilation cache dropped) failed
    3 times out of 3 (checked by hand with CPU_THREADS_PER_DEVICE = 1); on a machine with 16 or more cores
    the default pool would be large enough, and only the thread count below checks dsjax's part."""
    script = tmp_path / "side_by_side.py"
    script.write_text(SIDE_BY_SIDE)
    drop = ("PJRT_NPROC", "NPROC", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")  # compiled afresh, as measured
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["XLA_FLAGS"] = "--xla_cpu_collective_call_terminate_timeout_seconds=20"
    done = subprocess.run([sys.executable, str(script), "500"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]
    if os.path.isdir("/proc/self/task"):
        assert int(done.stdout.split("XLA threads:")[1]) >= 8 * jobenv.CPU_THREADS_PER_DEVICE


LAUNCHED = """
import os, signal, sys
rank, attempt = int(os.environ["RANK"]), int(os.environ["DSJAX_RESTART"])
print(f"rank {rank} of {os.environ['WORLD_SIZE']} attempt {attempt}", flush=True)
mode = sys.argv[1]
if mode == "config":
    sys.exit(2 if rank == 1 else 0)
if mode == "flaky" and attempt == 0 and rank == 1:
    sys.exit(1)
if mode == "crash" and attempt == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "always":
    sys.exit(3)
"""


@pytest.mark.parametrize(
    "mode, flags, code, words",
    [
        ("config", [], 2, ["rejected its configuration (rank 1: exit 2); not restarting"]),
        ("flaky", [], 0, ["restarting all 2", "attempt 2: 2 process(es)", "s since attempt 1 started)"]),
        ("crash", ["--min-nproc=1"], 0, ["killed by SIGKILL", "restarting with 1 (elastic", "all 1 process(es)"]),
        ("crash", [], 0, ["restarting all 2"]),
        ("always", ["--max-restarts=1"], 3, ["giving up after 1 restart(s)"]),
    ],
    ids=["config-not-retried", "restart", "elastic", "crash-not-elastic", "give-up"],
)
def test_launcher_restart_policy(tmp_path, mode, flags, code, words):
    """The launcher's decisions, with processes that do not start JAX."""
    script = tmp_path / "job.py"
    script.write_text(LAUNCHED)
    out = subprocess.run(
        [sys.executable, "-m", "dsjax.launch", "--nproc=2", *flags, f"--run={script}", "--", mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == code, out.stdout + out.stderr
    for word in words:
        assert word in out.stdout, out.stdout
    # each line carries its rank: the line of the process that exited first at least (the launcher may kill
    # the other before it prints)
    assert re.search(r"^\[rank (\d)\] rank \1 of 2 attempt 0$", out.stdout, re.MULTILINE), out.stdout


def test_a_restarted_job_may_reuse_a_directory_without_checkpoints(tmp_path, monkeypatch):
    """A job the launcher restarts before its first checkpoint finds its own config.json: it starts over
    there; anything else refuses to mix two runs in one directory."""
    from dsjax import rundir

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ds.ConfigError, match="already holds files"):
        rundir.check_out(tmp_path)
    monkeypatch.setenv("DSJAX_RESTART", "1")
    assert rundir.check_out(tmp_path) == tmp_path


def test_a_checkpoint_save_broken_by_a_dead_peer_waits_to_name_it(monkeypatch, capsys):
    """A peer that dies during a save breaks the save's collective (Gloo: 'connection reset by peer');
    the CLI then waits for the liveness watch to name the dead process (as for any failed collective)
    before reporting the checkpoint error, instead of blaming the save alone."""
    from dsjax import checkpoint, train

    waited = []
    monkeypatch.setattr(dd, "await_lost_peer", waited.append)

    def broken_save(argv):
        raise checkpoint.CheckpointError("saving failed: Gloo AllGather failed: Connection reset by peer")

    monkeypatch.setattr(train, "_main", broken_save)
    assert train.main([]) == 1
    assert [str(e) for e in waited] == ["saving failed: Gloo AllGather failed: Connection reset by peer"]
    assert "checkpoint error" in capsys.readouterr().err
