"""Checkpoints in one process: manifests and the corruption cases, fallback, shape and path errors, the
non-finite guard, a failing background save, preemption at a step boundary and exact resume, and restore
onto another mesh. (Killed processes and fresh-process restores: test_checkpoint_processes.py.)"""

import dataclasses
import json
import os
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dsjax import checkpoint as ckpt
from dsjax import checkpoint_memory, train
from dsjax.config import CheckpointConfig, Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig

ONE_DEVICE = MeshConfig(fsdp=1)
MODEL = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)


def config(steps=6, mesh=ONE_DEVICE, model=MODEL, **checkpoint) -> Config:
    return Config(
        model=model,
        mesh=mesh,
        data=DataConfig(source="default"),
        train=TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=2, eval_every=0, eval_batches=1),
        checkpoint=CheckpointConfig(**{"every": 2, **checkpoint}),
    )


def arrays(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in ckpt.flatten(state).items()}


def assert_same_state(a, b):
    a, b = arrays(a), arrays(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def trained_checkpoints(tmp_path, steps=(2, 4), **checkpoint):
    """A run saved at `steps` in tmp_path/ckpt; returns (run, {step: saved state as numpy})."""
    run = train.build(config(**checkpoint), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None)
    saved = {}
    for step in range(max(steps)):
        run.state, _ = run.train_step(run.state, train.batch_at(run, run.train_samples, step))
        if step + 1 in steps:
            assert saver.save(run.state, train.checkpoint_meta(run))
            saved[step + 1] = arrays(run.state)
    saver.close()
    return run, saved


def restore_into_fresh(tmp_path, logs=None, **checkpoint):
    run = train.build(config(**checkpoint), devices=jax.devices()[:1])
    log = logs.append if logs is not None else lambda _: None
    return run, train.restore(run, ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=log), log=log)


def test_checkpoint_config_errors_name_the_field():
    for field, value, fragment in [("every", -1, "checkpoint.every"), ("keep", 0, "checkpoint.keep")]:
        with pytest.raises(ConfigError, match=fragment):
            CheckpointConfig(**{field: value})


def test_a_checkpoint_holds_the_whole_state_and_the_data_position(tmp_path):
    _, saved = trained_checkpoints(tmp_path)
    for step in (2, 4):
        assert ckpt.verify(tmp_path / "ckpt" / str(step)) is None
    run, restored = restore_into_fresh(tmp_path)
    assert restored.path == tmp_path / "ckpt" / "4"
    assert {k: v for k, v in arrays(run.state).items()}.keys() == saved[4].keys()
    for key, value in arrays(run.state).items():
        np.testing.assert_array_equal(value, saved[4][key], err_msg=key)
    assert restored.meta["step"] == 4 and restored.meta["samples"] == 32 and restored.meta["batch_size"] == 8
    assert Config.from_dict(restored.meta["config"]) == run.config
    assert run.batch_offset == 0


def corrupt_truncate(step_dir):
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim.name


def corrupt_empty_metadata(step_dir):
    victim = step_dir / "_CHECKPOINT_METADATA"
    victim.write_text("")
    return victim.name


def corrupt_remove_manifest(step_dir):
    (step_dir / ckpt.MANIFEST).unlink()
    return ckpt.MANIFEST


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_empty_metadata, corrupt_remove_manifest])
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(tmp_path, corrupt):
    _, saved = trained_checkpoints(tmp_path)
    bad = tmp_path / "ckpt" / "4"
    name = corrupt(bad)
    logs = []
    run, restored = restore_into_fresh(tmp_path, logs)
    assert restored.path == tmp_path / "ckpt" / "2"
    for key, value in arrays(run.state).items():
        np.testing.assert_array_equal(value, saved[2][key], err_msg=key)
    warning = next(line for line in logs if "unusable" in line)
    assert str(bad) in warning and name in warning
    # the unusable newer checkpoint is moved aside (not deleted), out of the way of the coming saves
    assert not bad.exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "ckpt" / ckpt.REJECTED).iterdir()] == ["4"]


def test_without_fallback_a_corrupt_checkpoint_is_an_error(tmp_path):
    trained_checkpoints(tmp_path)
    corrupt_truncate(tmp_path / "ckpt" / "4")
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path / "ckpt" / "4")):
        restore_into_fresh(tmp_path, fallback=False)
    assert (tmp_path / "ckpt" / "4").exists()  # nothing moved or deleted


def test_when_every_checkpoint_is_corrupt_training_does_not_silently_start_over(tmp_path):
    trained_checkpoints(tmp_path)
    for step in (2, 4):
        corrupt_remove_manifest(tmp_path / "ckpt" / str(step))
    with pytest.raises(ckpt.CheckpointError, match="Start fresh in a new --out"):
        restore_into_fresh(tmp_path)


def test_restoring_into_another_model_shape_names_the_parameter_and_both_shapes(tmp_path):
    trained_checkpoints(tmp_path)
    wider = ModelConfig(**{**MODEL.__dict__, "d_ff": 96})
    run = train.build(config(model=wider), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None)
    with pytest.raises(ConfigError) as err:
        train.restore(run, saver)
    message = str(err.value)
    assert "parameter params.blocks.w_" in message and "in the checkpoint but" in message
    assert "64" in message and "96" in message and str(tmp_path / "ckpt" / "4") in message


def test_a_read_only_restore_does_not_warn_that_it_is_read_only(tmp_path, monkeypatch, caplog):
    """Orbax logs 'Given directory is read only' for each read-only manager (every restore from another run's
    directory); dsjax drops that one record and nothing else."""
    import contextlib
    import logging

    notice = "Given directory is read only"
    with caplog.at_level(logging.WARNING, logger="absl"):
        with monkeypatch.context() as m:
            m.setattr(ckpt, "_without_read_only_notice", contextlib.nullcontext)
            ckpt.Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
        assert notice in caplog.text  # what this Orbax does without the filter
        caplog.clear()
        ckpt.Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
        assert notice not in caplog.text
        logging.getLogger("absl").warning("%s=afterwards", notice)  # the filter is gone again
        assert f"{notice}=afterwards" in caplog.text


@pytest.mark.parametrize("restore, fragment", [("17", "no finalized checkpoint of step 17"), ("nowhere", "nowhere")])
def test_a_missing_restore_target_is_a_config_error_naming_it(tmp_path, monkeypatch, restore, fragment):
    trained_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=fragment):
        restore_into_fresh(tmp_path, restore=restore)


def test_restore_from_an_explicit_step_directory(tmp_path):
    _, saved = trained_checkpoints(tmp_path)
    run = train.build(config(), devices=jax.devices()[:1])
    cfg = CheckpointConfig(restore=str(tmp_path / "ckpt" / "2"))
    restored = train.restore(run, ckpt.Checkpointer(tmp_path / "other", cfg, log=lambda _: None), log=lambda _: None)
    assert restored.path == tmp_path / "ckpt" / "2"
    for key, value in arrays(run.state).items():
        np.testing.assert_array_equal(value, saved[2][key], err_msg=key)


def test_a_state_holding_nan_is_never_saved(tmp_path):
    run = train.build(config(), devices=jax.devices()[:1])
    poisoned = jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 and x.ndim == 2 else x, run.state)
    logs = []
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=logs.append)
    assert saver.save(poisoned, train.checkpoint_meta(run)) is False
    saver.close()
    assert saver.steps() == [] and any("NaN or Inf" in line for line in logs)


class FailingWrite(ocp.future.Future):
    """A background write that fails, as a full disk would."""

    def result(self, timeout=None):
        raise OSError("injected write failure")


def test_a_failed_background_save_stops_the_run_with_the_reason(tmp_path, monkeypatch, capsys):
    original = ocp.StandardCheckpointHandler.async_save

    async def failing(self, *args, **kwargs):
        return [*(await original(self, *args, **kwargs) or []), FailingWrite()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
    argv = [f"--out={tmp_path / 'run'}", "--train.steps=4", "--checkpoint.every=2", "--train.sample_tokens=0"]
    argv += ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=2"]
    code = train.main([*argv, "--model.d_ff=64", "--train.seq_len=32", "--train.eval_every=0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "checkpoint error" in err and "injected write failure" in err and "Traceback" not in err


def test_the_device_copy_is_its_own_buffers_with_the_same_layout():
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = jax.device_put(np.arange(64.0).reshape(8, 8), jax.NamedSharding(mesh, jax.P("fsdp")))
    replicated = jax.device_put(np.full((3,), 7, np.int32), jax.NamedSharding(mesh, jax.P()))
    originals = {"a": sharded, "b": replicated}
    copy = checkpoint_memory.device_copy(originals)
    expected = {k: np.asarray(v) for k, v in originals.items()}
    for key, value in originals.items():
        assert copy[key].sharding == value.sharding
        value.delete()  # as the next train step does when it donates the state
    for key in expected:
        np.testing.assert_array_equal(np.asarray(copy[key]), expected[key])


def test_arrays_on_different_devices_are_copied_off_them_in_the_loop_with_a_note(tmp_path):
    mesh = jax.make_mesh((8,), ("fsdp",))
    mixed = {
        "a": jax.device_put(np.ones((8, 8)), jax.NamedSharding(mesh, jax.P("fsdp"))),
        "b": jax.device_put(np.ones(3), jax.devices()[0]),
    }
    logs = []
    saver = ckpt.Checkpointer(tmp_path / "ckpt", CheckpointConfig(), log=logs.append)
    assert saver._copy_on_device(mixed) is None and saver._copy_on_device(mixed) is None
    assert len(logs) == 1 and "cannot be copied in one program" in logs[0]
    saver.close()


class GatedSave:
    """Orbax's save, held until `release` is set: records the thread each save was issued from."""

    def __init__(self, monkeypatch):
        self.release, self.threads, self.done = threading.Event(), [], []
        original = ocp.CheckpointManager.save

        def save(manager, step, *args, **kwargs):
            self.threads.append(threading.current_thread().name)
            assert self.release.wait(timeout=60), "the test never released the save"
            result = original(manager, step, *args, **kwargs)
            self.done.append(step)
            return result

        monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_training_goes_on_while_the_device_copy_is_taken_off_the_devices(tmp_path, monkeypatch):
    gate = GatedSave(monkeypatch)
    run = train.build(config(), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None)
    for step in range(2):
        run.state, _ = run.train_step(run.state, train.batch_at(run, run.train_samples, step))
    at_save = arrays(run.state)
    assert saver.save(run.state, train.checkpoint_meta(run))
    assert gate.threads == ["dsjax-checkpoint-handoff"] and gate.done == []  # save() did not wait for Orbax
    for step in range(2, 4):  # the loop goes on; each step donates (deletes) the state the save was given
        run.state, _ = run.train_step(run.state, train.batch_at(run, run.train_samples, step))
    gate.release.set()
    saver.close()
    assert gate.done == [2] and saver.steps() == [2] and ckpt.verify(tmp_path / "ckpt" / "2") is None
    _, restored = restore_into_fresh(tmp_path)
    for key, value in arrays(restored.state).items():
        np.testing.assert_array_equal(value, at_save[key], err_msg=key)


@pytest.mark.parametrize("why", ["no_room", "device_copy_off", "sync"])
def test_without_the_device_copy_the_loop_hands_the_state_to_orbax_itself(tmp_path, monkeypatch, why):
    gate = GatedSave(monkeypatch)
    gate.release.set()
    logs = []
    settings = {"device_copy_off": {"device_copy": False}, "sync": {"async_save": False}}.get(why, {})
    run = train.build(config(**settings), devices=jax.devices()[:1])
    if why == "no_room":
        monkeypatch.setattr(ckpt, "device_room", lambda arrays: "cpu:0 has 0.10 GiB free at its peak")
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=logs.append)
    for step in (2, 4):
        run.state = dataclasses.replace(run.state, step=jax.numpy.asarray(step, run.state.step.dtype))
        assert saver.save(run.state, train.checkpoint_meta(run))
    saver.close()
    assert gate.threads == ["MainThread", "MainThread"] and saver.steps() == [2, 4]
    notes = [line for line in logs if "no copy on the devices" in line]
    assert len(notes) == (1 if why == "no_room" else 0)
    if notes:
        assert "0.10 GiB free" in notes[0] and "--checkpoint.device_copy=false" in notes[0]


def test_device_room_names_the_device_without_room_for_its_part():
    class Device:
        def __init__(self, name, stats):
            self.name, self.stats = name, stats

        def memory_stats(self):
            return self.stats

        def __str__(self):
            return self.name

    class Shard:
        def __init__(self, device, nbytes):
            self.device, self.data = device, types.SimpleNamespace(nbytes=nbytes)

    class Array:
        def __init__(self, *shards):
            self.addressable_shards = list(shards)

    gib = 2**30
    roomy = Device("gpu:0", {"bytes_limit": 80 * gib, "peak_bytes_in_use": 60 * gib})
    tight = Device("gpu:1", {"bytes_limit": 80 * gib, "peak_bytes_in_use": 80 * gib - gib // 2})
    cpu = Device("cpu:0", None)
    assert checkpoint_memory.device_room({"w": Array(Shard(roomy, gib), Shard(cpu, gib))}) is None
    state = {"w": Array(Shard(roomy, gib), Shard(tight, gib // 4)), "m": Array(Shard(tight, gib // 2))}
    missing = checkpoint_memory.device_room(state)
    assert missing == (
        "gpu:1 has 0.50 GiB free at its peak, and its part of the state is 0.75 GiB (plus 5% of its memory kept spare)"
    )
    just_fits = Device("gpu:2", {"bytes_limit": 80 * gib, "peak_bytes_in_use": 75 * gib})  # 5 GiB free, 4 spare
    assert checkpoint_memory.device_room({"w": Array(Shard(just_fits, gib - 1))}) is None
    assert checkpoint_memory.device_room({"w": Array(Shard(just_fits, gib + 1))}) is not None


def test_host_memory_is_reserved_for_each_device_s_part_of_one_copy(monkeypatch):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    arrays = {
        "w": jax.device_put(np.ones((8, 16), np.float32), jax.NamedSharding(mesh, jax.P("fsdp"))),  # 2 replicas
        "b": jax.device_put(np.ones((3,), jnp.bfloat16), jax.NamedSharding(mesh, jax.P())),  # 8 replicas
        "step": jax.device_put(np.int32(5), jax.NamedSharding(mesh, jax.P())),
    }
    shares = checkpoint_memory.host_copy_shares(arrays)
    # Orbax's rule: the replicas of w's (2, 16) shards copy a half each; b (3 values, 8 replicas) and the
    # scalar cannot be sliced 8 ways: their first replica copies all of them
    first = jax.devices()[0]
    assert shares == {device: 64 + (6 + 4 if device == first else 0) for device in jax.devices()}
    buffers = checkpoint_memory.pinned_buffers(shares)  # the CPU devices have pinned host memory too
    assert {(b.nbytes, b.sharding.memory_kind, *b.sharding.device_set) for b in buffers} == {
        (nbytes, "pinned_host", device) for device, nbytes in shares.items()
    }
    assert checkpoint_memory.reserve_pinned_host(shares) == 8 * 64 + 10
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # Orbax then copies every shard from its first replica
    w_firsts = {s.device for s in arrays["w"].addressable_shards if s.replica_id == 0}
    assert checkpoint_memory.host_copy_shares(arrays) == {
        device: (128 if device in w_firsts else 0) + (10 if device == first else 0) for device in w_firsts | {first}
    }
    one = {"w": jax.device_put(np.ones((8, 16), np.float32), jax.devices()[3])}
    assert checkpoint_memory.host_copy_shares(one) == {jax.devices()[3]: 512}


def test_host_memory_for_the_first_save_is_reserved_only_where_orbax_pins_it(tmp_path, monkeypatch):
    run = train.build(config(), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None)
    saver.reserve_host_memory(run.state)
    saver.wait()
    assert saver.reserved is None  # on CPUs Orbax copies into ordinary host memory
    monkeypatch.setattr(ckpt, "orbax_pins_host", lambda: True)
    saver.reserve_host_memory(run.state)
    saver.close()  # waits for the reservation
    assert saver.reserved[0] == sum(x.nbytes for x in ckpt.flatten(run.state).values())
    assert not (tmp_path / "ckpt").exists()


def test_a_run_rejected_before_training_waits_for_the_host_memory_reservation(tmp_path, monkeypatch, capsys):
    reserved = threading.Event()

    def slow_reservation(shards):
        time.sleep(0.5)
        reserved.set()
        return 0

    monkeypatch.setattr(ckpt, "orbax_pins_host", lambda: True)
    monkeypatch.setattr(ckpt, "reserve_pinned_host", slow_reservation)
    out = tmp_path / "run"
    small = ["--train.batch_size=8", "--train.seq_len=32", "--model.n_layers=1", "--model.d_model=32",
             "--model.n_heads=2", "--model.n_kv_heads=2", "--model.d_ff=64"]  # fmt: skip
    code = train.main([f"--out={out}", "--train.memory_budget_gb=0.00001", *small])
    assert code == 2 and "KiB budget" in capsys.readouterr().err
    assert reserved.is_set() and not out.exists()


def test_training_starts_once_the_host_memory_reservation_is_done(tmp_path, monkeypatch):
    compiled, reserved, seen = threading.Event(), threading.Event(), []
    real_prepare = train.prepare

    def slow_reservation(shares):  # still pinning when the step has compiled (as from a compilation cache)
        compiled.wait(timeout=60)
        time.sleep(0.5)
        reserved.set()
        return 0

    monkeypatch.setattr(ckpt, "orbax_pins_host", lambda: True)
    monkeypatch.setattr(ckpt, "reserve_pinned_host", slow_reservation)
    monkeypatch.setattr(train, "prepare", lambda *args: (real_prepare(*args), compiled.set())[0])
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: seen.append(reserved.is_set()) or [])
    train.train(config(mesh=MeshConfig()), out=tmp_path / "run", progress=False, log=lambda _: None)
    assert seen == [True]


def test_a_rerun_of_a_finished_run_reserves_no_host_memory(tmp_path, monkeypatch):
    reservations = []
    monkeypatch.setattr(ckpt, "orbax_pins_host", lambda: True)
    monkeypatch.setattr(ckpt, "reserve_pinned_host", lambda shares: reservations.append(len(shares)) or 0)
    cfg = config(mesh=MeshConfig())
    train.train(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    assert len(reservations) == 1
    # restores the final checkpoint of its own directory: nothing left to train or save
    train.train(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    assert len(reservations) == 1
    # the same checkpoint into another run directory: its last step is saved there, so it reserves
    other = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, restore=str(tmp_path / "run" / "checkpoints")))
    train.train(other, out=tmp_path / "other", progress=False, log=lambda _: None)
    assert len(reservations) == 2


def test_a_failed_handoff_is_reported_and_the_save_before_it_still_gets_its_manifest(tmp_path, monkeypatch):
    original = ocp.StandardCheckpointHandler.async_save

    async def failing(self, directory, *args, **kwargs):
        if f"{os.sep}4." in str(directory):  # Orbax's temporary directory of step 4
            raise OSError("injected: disk full while saving step 4")
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
    run = train.build(config(), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None)
    for step in (2, 4):
        run.state = dataclasses.replace(run.state, step=jax.numpy.asarray(step, run.state.step.dtype))
        assert saver.save(run.state, train.checkpoint_meta(run))  # the handoff fails later, in its thread
    saver._join_handoff()
    with pytest.raises(ckpt.CheckpointError, match="injected: disk full while saving step 4"):
        saver.check()  # what the training loop calls after its steps
    assert ckpt.verify(tmp_path / "ckpt" / "2") is None  # verifiable without close(): a kill now resumes from 2
    with pytest.raises(ckpt.CheckpointError):
        saver.close()


class StopAt:
    """A Preemption whose signal 'arrives' once the run reaches `step`."""

    def __init__(self, run_holder, step):
        self.run_holder, self.step, self.requested = run_holder, step, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def agreed(self):
        if int(jax.device_get(self.run_holder[0].state.step)) >= self.step:
            self.requested = "SIGTERM"
        return self.requested is not None


def test_preemption_saves_at_the_step_boundary_and_the_rerun_continues_exactly(tmp_path, monkeypatch):
    holder = []
    real_fit = train.fit

    def fit(run, *args):
        holder.append(run)
        return real_fit(run, *args)

    cfg = config(steps=8, mesh=MeshConfig(), every=100)  # train() uses every device: fsdp 8
    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(ckpt, "Preemption", lambda: StopAt(holder, 3))
    with pytest.raises(train.Preempted, match="SIGTERM received: stopped after step 3"):
        train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert ckpt.verify(tmp_path / "run" / "checkpoints" / "3") is None

    monkeypatch.setattr(ckpt, "Preemption", lambda: StopAt(holder, 10**9))
    resumed, history = train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    straight, straight_history = train.train(cfg, tmp_path / "straight", progress=False, log=lambda _: None)
    assert_same_state(resumed.state, straight.state)
    losses = {r["step"]: r["loss"] for r in straight_history if "loss" in r}
    assert {r["step"]: r["loss"] for r in history if "loss" in r} == {s: v for s, v in losses.items() if s > 3}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "restored_from": str((tmp_path / "run" / "checkpoints" / "3").absolute())} in records


def test_rerunning_a_finished_run_restores_it_and_trains_nothing(tmp_path):
    cfg = config(steps=4, mesh=MeshConfig())
    first, _ = train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_text()
    logs = []
    again, history = train.train(cfg, tmp_path / "run", progress=False, log=logs.append)
    assert_same_state(first.state, again.state)
    assert history == [] and metrics.read_text() == before  # nothing compiled, evaluated or written
    assert "the run is already complete (step 4 of train.steps=4): nothing to train" in logs[-1]
    # stopped between its last save and its final evaluation: the rerun evaluates, and trains nothing
    lines = before.splitlines(keepends=True)
    assert json.loads(lines[-1]) == {"step": 4, "eval_loss": json.loads(lines[-1])["eval_loss"]}
    metrics.write_text("".join(lines[:-1]))
    _, history = train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert [r for r in history if "loss" in r] == [] and history[-1]["step"] == 4 and "eval_loss" in history[-1]
    # an attempt after the final evaluation that stopped before its own: that evaluation is stale
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 2, "restored_from": "elsewhere"}) + "\n")
    _, history = train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert history and history[-1] == json.loads(metrics.read_text().splitlines()[-1])


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused_and_writes_nothing(tmp_path):
    train.train(config(steps=4, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)

    def files():
        return {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    before = files()
    assert ckpt.Checkpointer(tmp_path / "run" / "checkpoints", CheckpointConfig(), log=print).steps() == [2, 4]
    with pytest.raises(ConfigError, match=r"at step 4, past train\.steps=3.*--train\.steps=4 or more"):
        train.train(config(steps=3, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)
    assert files() == before  # checkpoint 4 was not set aside, config.json not rewritten


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_an_unusable_checkpoint_directory_is_refused_before_training(tmp_path, monkeypatch, where):
    target = tmp_path / "ckpt"
    if where == "a file":
        target.write_text("x")
        fragment = "is a file"
    else:
        target.mkdir()
        real_access = os.access  # root may write anywhere: the directory reads as read-only to the check
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode))
        fragment = "is not writable"
    cfg = config(mesh=MeshConfig(), dir=str(target))
    with pytest.raises(ConfigError, match=rf"--checkpoint\.dir \({target}\).*{fragment}"):
        train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_resuming_with_other_data_settings_warns_and_names_them(tmp_path):
    train.train(config(steps=2, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)
    cfg = config(steps=4, mesh=MeshConfig())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5))
    logs = []
    train.train(cfg, tmp_path / "run", progress=False, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning: resuming with data settings")]
    assert len(warnings) == 1 and "train.seed 0 -> 5" in warnings[0] and "data.source" not in warnings[0]
    logs.clear()
    train.train(config(steps=6, mesh=MeshConfig()), tmp_path / "run2", progress=False, log=logs.append)
    train.train(config(steps=8, mesh=MeshConfig()), tmp_path / "run2", progress=False, log=logs.append)
    assert not [line for line in logs if line.startswith("warning: resuming")]  # the same settings: no warning


def test_restoring_from_a_run_directory_points_to_its_checkpoints(tmp_path):
    train.train(config(steps=2, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)
    cfg = config(steps=4, mesh=MeshConfig(), restore=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"holds no finalized checkpoint\. It looks like a run directory: its "):
        train.train(cfg, tmp_path / "other", progress=False, log=lambda _: None)


def test_restore_none_refuses_an_existing_run_directory(tmp_path):
    train.train(config(steps=2, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"checkpoint\.restore=none"):
        cfg = config(steps=2, mesh=MeshConfig(), restore="none")
        train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)


def test_restore_onto_another_mesh_lays_every_array_out_for_it(tmp_path):
    """Saved from data 2 x fsdp 2 x tensor 2 on 8 devices, restored onto fsdp 4 and onto 1 device."""
    model = ModelConfig(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    source = train.build(config(model=model, mesh=MeshConfig(data=2, fsdp=2, tensor=2)), devices=jax.devices())
    source.state, _ = source.train_step(source.state, train.batch_at(source, source.train_samples, 0))
    saver = ckpt.Checkpointer(tmp_path / "ckpt", source.config.checkpoint, log=lambda _: None)
    saver.save(source.state, train.checkpoint_meta(source))
    saver.close()
    for mesh, devices in [(MeshConfig(fsdp=4), jax.devices()[:4]), (MeshConfig(fsdp=1), jax.devices()[:1])]:
        run = train.build(config(model=model, mesh=mesh), devices=devices)
        wanted = {k: v.sharding for k, v in ckpt.flatten(run.state).items()}
        train.restore(run, ckpt.Checkpointer(tmp_path / "ckpt", run.config.checkpoint, log=lambda _: None), log=print)
        for key, value in ckpt.flatten(run.state).items():
            assert value.sharding.is_equivalent_to(wanted[key], value.ndim), key
        assert_same_state(run.state, source.state)
        assert nnx.to_flat_state(run.state.params)  # a real parameter tree came back


def test_only_the_newest_verified_checkpoints_are_kept(tmp_path):
    """keep=1 with async saves: each old checkpoint goes only once its successor has a manifest."""
    run = train.build(config(), devices=jax.devices()[:1])
    saver = ckpt.Checkpointer(tmp_path / "ckpt", CheckpointConfig(keep=1), log=lambda _: None)
    for step in range(4):
        run.state, _ = run.train_step(run.state, train.batch_at(run, run.train_samples, step))
        assert saver.save(run.state, train.checkpoint_meta(run))
    saver.close()
    assert saver.steps() == [4]
    assert ckpt.verify(tmp_path / "ckpt" / "4") is None


def test_a_refused_restore_leaves_no_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="no finalized checkpoint of step 7"):
        train.train(config(mesh=MeshConfig(), restore="7"), tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_run_directory_without_checkpoints_is_not_resumed(tmp_path):
    cfg = config(steps=2, mesh=MeshConfig(), enabled=False)
    train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train.train(config(steps=2, mesh=MeshConfig()), tmp_path / "run", progress=False, log=lambda _: None)


def test_every_step_a_checkpoint_covers_is_logged_before_the_save(tmp_path, monkeypatch):
    """A job killed right after a save resumes past the saved steps and never logs them again, so the
    metrics of a checkpoint's steps are written before it is saved (the loop otherwise reads them late)."""
    logged_at_save = {}
    save = ckpt.Checkpointer.save

    def spy(self, state, meta):
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        logged_at_save[meta["step"]] = {r["step"] for r in rows if "loss" in r}
        return save(self, state, meta)

    monkeypatch.setattr(ckpt.Checkpointer, "save", spy)
    cfg = config(steps=6, mesh=MeshConfig())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=1))
    train.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert sorted(logged_at_save) == [2, 4, 6]
    for step, steps in logged_at_save.items():
        assert set(range(1, step + 1)) <= steps, (step, steps)
