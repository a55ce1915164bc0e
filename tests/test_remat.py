"""Remat policies: identical gradients to no remat, less temporary memory, and the guard rails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import Config, ConfigError, ModelConfig, RematConfig, TrainConfig
from dsjax.jobenv import ProcessEnv
from dsjax.models import Decoder
from dsjax.remat import REMAT_POLICIES
from dsjax.step import loss_fn
from dsjax.train import build, main

MODEL = ModelConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128)
SMALL_MODEL = ModelConfig(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
ON_DEVICE = [p for p in REMAT_POLICIES if p != "offload"]


def grad_fn(policy: str, every: int, family: str = "llama", cfg: ModelConfig = MODEL, prevent_cse: bool = False):
    """(jitted grad function, params) for a model under a remat policy; init is policy-independent."""
    if family == "gpt2":
        cfg = ModelConfig(**{**cfg.__dict__, "family": "gpt2", "n_kv_heads": cfg.n_heads})
    model = Decoder(cfg, rngs=nnx.Rngs(0), remat_policy=policy, remat_every=every, remat_prevent_cse=prevent_cse)
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(jax.grad(lambda p, batch: loss_fn(graphdef, p, batch, None))), params


BATCH = jax.random.randint(jax.random.key(0), (8, 129), 0, 256)
SMALL_BATCH = BATCH[:4, :33]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_policy_gives_the_gradients_of_no_remat(family):
    ref_fn, params = grad_fn("none", 1, family, SMALL_MODEL)
    reference = jax.tree.leaves(ref_fn(params, SMALL_BATCH))
    for policy, every in [(p, 1) for p in ON_DEVICE if p != "none"] + [("full", 2), ("minimal", 4)]:
        fn, same_params = grad_fn(policy, every, family, SMALL_MODEL)
        grads = jax.tree.leaves(fn(same_params, SMALL_BATCH))
        for got, want in zip(grads, reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=f"{policy} every={every}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prevent_cse_gives_the_same_gradients_and_reaches_the_checkpoint(family):
    """remat.prevent_cse changes what XLA may merge, not the arithmetic: unrolled layers (scan_layers=False)
    under a policy give autodiff's gradients either way, and the flag is the one jax.checkpoint gets."""
    unrolled = ModelConfig(**{**SMALL_MODEL.__dict__, "scan_layers": False})
    ref_fn, params = grad_fn("none", 1, family, unrolled)
    reference = jax.tree.leaves(ref_fn(params, SMALL_BATCH))
    for prevent_cse in (False, True):
        fn, same_params = grad_fn("dots", 2, family, unrolled, prevent_cse)
        for got, want in zip(jax.tree.leaves(fn(same_params, SMALL_BATCH)), reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=f"prevent_cse={prevent_cse}")
        text = str(jax.make_jaxpr(fn)(same_params, SMALL_BATCH))
        assert f"prevent_cse={prevent_cse}" in text and f"prevent_cse={not prevent_cse}" not in text
    # ... and the barriers reach the program XLA compiles
    barriers = [
        grad_fn("dots", 2, family, unrolled, pc)[0].lower(params, SMALL_BATCH).as_text().count("optimization_barrier")
        for pc in (False, True)
    ]
    assert barriers[1] > barriers[0], barriers


def test_prevent_cse_saves_memory_on_unrolled_llama_layers():
    """What the knob is for: with the barriers XLA keeps fewer forward-pass intermediates alive (on this CPU
    build 54.8 -> 52.1 MB of temporaries for this model; llama-1b batch 12 on an H200: 60.5 -> 53.4 GiB)."""
    unrolled = ModelConfig(**{**MODEL.__dict__, "scan_layers": False})
    assert temp_bytes("dots", cfg=unrolled, prevent_cse=True) < temp_bytes("dots", cfg=unrolled)


def test_preflight_offers_prevent_cse_only_where_it_helps(capsys):
    tight = ["--dry-run", "--train.memory_budget_gb=0.0001", *SMALL]
    assert main(["--dry-run", "--remat.policy=dots", "--remat.prevent_cse=true", *SMALL]) == 0
    assert "remat: dots every 1 layers, prevent_cse" in capsys.readouterr().out
    for extra, offered in [
        (["--remat.policy=dots", "--model.scan_layers=false"], True),
        (["--remat.policy=dots", "--model.scan_layers=false", "--remat.prevent_cse=true"], False),
        (["--remat.policy=none", "--model.scan_layers=false"], False),  # nothing recomputed
        (["--remat.policy=dots", "--model.scan_layers=true"], False),  # a rolled scan: nothing to merge
    ]:
        assert main([*tight, *extra]) == 2  # the dry run's preflight would stop a real run
        assert ("--remat.prevent_cse=true" in capsys.readouterr().err) == offered, extra


def temp_bytes(policy: str, every: int = 1, cfg: ModelConfig = MODEL, prevent_cse: bool = False) -> int:
    fn, params = grad_fn(policy, every, cfg=cfg, prevent_cse=prevent_cse)
    return fn.lower(params, BATCH).compile().memory_analysis().temp_size_in_bytes


def test_full_and_dots_need_less_temporary_memory_than_none():
    none = temp_bytes("none")
    assert temp_bytes("full") < none
    assert temp_bytes("dots") < none
    assert temp_bytes("full", every=2) < none


def test_the_gradient_program_recomputes_only_with_a_policy():
    def jaxpr(policy):
        model = Decoder(MODEL, rngs=nnx.Rngs(0), remat_policy=policy)
        graphdef, params = nnx.split(model, nnx.Param)
        return str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(graphdef, p, BATCH, None)))(params))

    assert "remat" not in jaxpr("none")
    assert "remat" in jaxpr("full")


@pytest.mark.parametrize("policy", ["dots", "dots_attention"])
def test_dots_policies_save_the_weight_matmuls_under_the_stage_vmap(policy):
    """GPipe and circular differentiate `vmap(stage)` over the stages, whose weights are batched too: each
    weight matmul then has a batch dimension, and JAX's no-batch-dims policy would recompute them all in
    the backward pass. The stage made with `vmapped=True` recomputes as many matmuls as the plain stage
    (the attention's two, which the policy must not save) and no more; seven more without it (q, k, v, o,
    gate, up, down)."""
    model = Decoder(SMALL_MODEL, rngs=nnx.Rngs(0), remat_policy=policy)
    weights, x = model.blocks.arrays(), jnp.ones((2, 32, 32))
    staged = (jax.tree.map(lambda a: jnp.stack([a, a]), weights), jnp.stack([x, x]))

    def matmuls(f, *args):
        return str(jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1)))(*args)).count("dot_general")

    plain = matmuls(model.stage_fn(32), weights, x)
    assert matmuls(jax.vmap(model.stage_fn(32, vmapped=True)), *staged) == plain
    assert matmuls(jax.vmap(model.stage_fn(32)), *staged) == plain + 7


def test_offload_is_a_clear_error_on_cpu():
    config = Config(model=MODEL, remat=RematConfig(policy="offload"), train=TrainConfig(seq_len=32, batch_size=8))
    with pytest.raises(ConfigError, match=r"remat\.policy='offload'.*cpu"):
        build(config)


def test_every_must_divide_the_layers():
    with pytest.raises(ConfigError, match=r"remat\.every \(3\) must divide model\.n_layers \(4\)"):
        Config(model=MODEL, remat=RematConfig(policy="full", every=3))
    with pytest.raises(ConfigError, match=r"remat\.policy must be one of"):
        RematConfig(policy="some")


SMALL = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=2", "--model.d_ff=64",
         "--train.batch_size=8", "--train.seq_len=32", "--model.max_seq_len=32"]  # fmt: skip


def test_dry_run_names_the_policies_and_the_memory(capsys):
    assert main(["--dry-run", "--remat.policy=full", "--remat.every=2", "--precision.policy=bf16", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "remat: full every 2 layers" in out
    assert "precision: bf16 (p=f32,c=bf16,o=f32)" in out
    for line in ("parameters ", "optimizer state", "temporaries", "step total", "checkpoint copy "):
        assert line in out
    assert main(["--dry-run", "--checkpoint.device_copy=false", *SMALL]) == 0
    assert "checkpoint copy" not in capsys.readouterr().out


def test_preflight_stops_a_run_that_does_not_fit(capsys, tmp_path):
    out = tmp_path / "run"
    code = main([f"--out={out}", "--train.memory_budget_gb=0.0001", *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.memory_budget_gb" in err and "per device" in err
    for knob in ("--remat.policy=full", "--mesh.fsdp", "--train.batch_size"):
        assert knob in err
    assert "Traceback" not in err
    assert main(["--dry-run", "--train.memory_budget_gb=0.0001", *SMALL]) == 2
    assert "preflight: a real run would stop here" in capsys.readouterr().err


class _FakeDevice:
    """A device as `memory.preflight` sees one: a platform, a kind and the allocator's limit."""

    def __init__(self, platform: str, limit: int | None):
        self.platform, self.device_kind, self._limit = platform, f"fake {platform}", limit

    def memory_stats(self):
        return None if self._limit is None else {"bytes_limit": self._limit}


def test_a_budget_below_the_gpu_names_the_schedulers_memory_limit(monkeypatch):
    from types import SimpleNamespace

    from dsjax import memory

    gib = memory.GIB

    def step(temporaries_gib):  # 8 GiB of arguments and outputs (donated: counted once)
        return SimpleNamespace(
            argument_size_in_bytes=8 * gib,
            output_size_in_bytes=8 * gib,
            alias_size_in_bytes=8 * gib,
            temp_size_in_bytes=temporaries_gib * gib,
        )

    def advice(budget_gb, device, temporaries_gib=64):
        config = Config(train=TrainConfig(memory_budget_gb=budget_gb))
        with pytest.raises(ConfigError) as err:
            memory.preflight(config, step(temporaries_gib), device, {"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1})
        assert "--train.batch_size" in str(err.value)
        return str(err.value)

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    gpu = _FakeDevice("gpu", 120 * gib)
    # 95 x (60 - 8) / (120 - 8) = 44.1: the limit XLA's scheduler would take from a 60 GiB allocator
    assert "--xla_gpu_memory_limit_slop_factor=44 " in advice(60, gpu) and "120.00 GiB" in advice(60, gpu)
    for device in (_FakeDevice("tpu", 120 * gib), _FakeDevice("gpu", None)):  # no GPU allocator: no such knob
        assert "slop_factor" not in advice(60, device)
    assert "slop_factor" not in advice(130, gpu, temporaries_gib=132)  # a budget above the allocator's limit
    assert "slop_factor" not in advice(6, gpu)  # below the step's own arguments: no factor helps
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_memory_limit_slop_factor=80")  # the user chose one already
    assert "slop_factor" not in advice(60, gpu)
    monkeypatch.delenv("XLA_FLAGS")
    with pytest.raises(ConfigError) as err:  # the allocator's own limit: the scheduler already plans against it
        memory.preflight(Config(), step(64), _FakeDevice("gpu", 60 * gib), {"fsdp": 1, "pipeline": 1})
    assert "slop_factor" not in str(err.value) and "the JAX allocator's limit on fake gpu" in str(err.value)
    memory.preflight(Config(train=TrainConfig(memory_budget_gb=80)), step(64), gpu, {"fsdp": 1, "pipeline": 1})


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="about CPU devices; JAX runs on another backend here")
def test_on_cpus_the_budget_is_the_machines_memory_over_its_devices(monkeypatch, capsys, tmp_path):
    """CPUs report no allocator limit; their devices share the machine's memory, so a step that needs more
    than its share stops before it runs (gpt2-124m on a 23.5 GiB machine had compiled to 94.5 GiB a device)."""
    from types import SimpleNamespace

    from dsjax import memory

    host = memory.host_memory()
    assert host is not None and host > 2**28  # this Linux machine reports its memory
    gib = memory.GIB
    monkeypatch.setattr(memory, "host_memory", lambda: 16 * gib)
    step = SimpleNamespace(
        argument_size_in_bytes=gib, output_size_in_bytes=gib, alias_size_in_bytes=gib, temp_size_in_bytes=2 * gib
    )
    n = len(jax.local_devices(backend="cpu"))
    assert memory.budget(Config(), _FakeDevice("cpu", None))[0] == 16 * gib // n
    degrees = {"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1}
    with pytest.raises(ConfigError) as err:
        memory.preflight(Config(), step, _FakeDevice("cpu", None), degrees)
    assert f"this machine's 16.00 GiB of memory shared by {n} CPU device(s)" in str(err.value)
    assert "a GPU, or a machine with more memory" in str(err.value) and "MEM_FRACTION" not in str(err.value)
    memory.preflight(Config(train=TrainConfig(memory_budget_gb=4)), step, _FakeDevice("cpu", None), degrees)
    with monkeypatch.context() as m:  # two processes of a job on this machine
        m.setattr(memory.distributed, "process_env", lambda: ProcessEnv(2, 1, 1, 2, "localhost:1234", "torchrun"))
        limit, source = memory.budget(Config(), _FakeDevice("cpu", None))
        assert limit == 16 * gib // (2 * n) and f"shared by 2 processes' {2 * n} CPU device(s)" in source
    monkeypatch.setattr(memory, "host_memory", lambda: None)  # unknown: no check
    memory.preflight(Config(), step, _FakeDevice("cpu", None), degrees)

    monkeypatch.setattr(memory, "host_memory", lambda: 2**20)  # the command line: a run stops before step 0
    assert main([f"--out={tmp_path / 'run'}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "of memory shared by" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_host_memory_takes_the_lowest_limit_of_the_processs_control_groups(tmp_path, monkeypatch):
    """A SLURM job's or systemd unit's memory limit sits on a group above the process, not at the root."""
    from dsjax import memory

    own = tmp_path / "proc-self-cgroup"
    own.write_text("4:memory,cpu:/job/step\n0::/slice/job/step\n")
    root = tmp_path / "cgroup"
    for folder, name, text in [
        ("", "memory.max", "max"),  # no limit at the root
        ("slice/job", "memory.max", str(3 * 2**30)),  # v2: the job's 3 GiB
        ("slice/job/step", "memory.max", "max"),
        ("memory/job", "memory.limit_in_bytes", str(2**63 - 4096)),  # v1: "unlimited"
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(text + "\n")
    files = memory._cgroup_limit_files(root, own)
    assert root / "slice/job/memory.max" in files and root / "memory/job/step/memory.limit_in_bytes" in files
    monkeypatch.setattr(memory, "_cgroup_limit_files", lambda: files)
    assert memory.host_memory() == min(
        3 * 2**30, memory.os.sysconf("SC_PAGE_SIZE") * memory.os.sysconf("SC_PHYS_PAGES")
    )


def test_remat_dtype_is_unchanged():
    fn, params = grad_fn("full", 2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(fn(params, BATCH)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_loss_matches_the_full_loss_and_needs_less_memory(family):
    cfg = ModelConfig(**{**MODEL.__dict__, "vocab_size": 2048})
    if family == "gpt2":
        cfg = ModelConfig(**{**cfg.__dict__, "family": "gpt2", "n_kv_heads": cfg.n_heads, "tie_embeddings": True})
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = jax.random.randint(jax.random.key(1), (8, 129), 0, 2048)

    def value_and_grad(chunk):
        fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b, None, chunk=chunk)))
        return fn(params, batch), fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    (full_loss, full_grads), full_temp = value_and_grad(0)
    (loss, grads), temp = value_and_grad(16)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert temp < full_temp
