"""--checkpoint.rollback_on_nonfinite: a non-finite step restores the newest good checkpoint before it and
training goes on without the offending batch; the result equals a run that never saw that batch."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import checkpoint as ckpt
from dsjax import train
from dsjax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    PrecisionConfig,
    TrainConfig,
)

MODEL = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
STEPS = 8


def config(**checkpoint) -> Config:
    return Config(
        model=MODEL,
        mesh=MeshConfig(fsdp=1),
        data=DataConfig(source="default"),
        train=TrainConfig(steps=STEPS, batch_size=8, seq_len=32, log_every=1, eval_every=0, eval_batches=1),
        precision=PrecisionConfig(max_consecutive_skips=2),
        checkpoint=CheckpointConfig(**{"every": 2, "rollback_on_nonfinite": True, **checkpoint}),
    )


def host(batch) -> np.ndarray:
    return np.asarray(jax.device_get(batch))


def poisoning(run, bad: set[int], mode: str):
    """The run's compiled step, except on the global batches `bad`: 'nan' applies the step and then
    makes the parameters and the loss NaN (a diverged update); 'skip' returns the state unchanged with
    the skip counters of an in-place skipped step and a finite loss (non-finite gradients)."""
    real = train.prepare(run, log=lambda _: None)
    bad_batches = [host(train.batch_at(run, run.train_samples, i)) for i in sorted(bad)]

    def step(state, batch):
        is_bad = any(np.array_equal(host(batch), b) for b in bad_batches)
        if is_bad and mode == "skip":
            streak = state.loss_scale.consecutive_skips + 1
            loss_scale = dataclasses.replace(
                state.loss_scale, consecutive_skips=streak, skipped_steps=state.loss_scale.skipped_steps + 1
            )
            new = dataclasses.replace(state, step=state.step + 1, loss_scale=loss_scale)
            metrics = {"loss": 3.0, "grad_norm": np.inf, "lr": 0.0, "loss_scale": 1.0}
            metrics = {k: jnp.float32(v) for k, v in metrics.items()}
            return new, {
                **metrics,
                "skipped_steps": jnp.copy(loss_scale.skipped_steps),
                "consecutive_skips": jnp.copy(streak),
            }
        new, metrics = real(state, batch)
        if is_bad:
            new = dataclasses.replace(new, params=jax.tree.map(lambda x: x * np.nan, new.params))
            metrics = {**metrics, "loss": jnp.float32(np.nan)}
        return new, metrics

    return step


def trained(tmp_path, cfg, bad: set[int], mode="nan"):
    run = train.build(cfg, devices=jax.devices()[:1])
    logs = []
    saver = ckpt.Checkpointer(tmp_path / "ckpt", cfg.checkpoint, log=logs.append)
    history = train.fit(run, tmp_path, False, logs.append, poisoning(run, bad, mode), saver)
    saver.close()
    return run, history, logs, saver


def control(cfg, batches: list[int]):
    """A plain run over exactly these global batches."""
    run = train.build(cfg, devices=jax.devices()[:1])
    for index in batches:
        run.state, _ = run.train_step(run.state, train.batch_at(run, run.train_samples, index))
    return run


def assert_same(a, b):
    a, b = ckpt.flatten(a), ckpt.flatten(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(host(a[key]), host(b[key]), err_msg=key)


def test_a_nan_step_rolls_back_to_the_last_good_checkpoint_and_leaves_its_batch_out(tmp_path):
    cfg = config()
    run, history, logs, saver = trained(tmp_path, cfg, bad={5})
    # the step on batch 5 made everything NaN; checkpoint 4 was restored and batch 5 left out
    assert_same(run.state, control(cfg, [0, 1, 2, 3, 4, 6, 7, 8]).state)
    rollback = [r for r in history if "rollback_to" in r]
    assert rollback == [{"step": 6, "rollback_to": 4, "skipped_batches": [5], "reason": "the loss of step 6 is nan"}]
    assert any("rolled back to the checkpoint of step 4" in line for line in logs)
    # a checkpoint's steps are read before it is saved, so the NaN was seen before step 6's save was tried
    assert not any("not saving a checkpoint" in line for line in logs)
    assert not (tmp_path / "ckpt" / ckpt.REJECTED).exists()
    # steps 1-5 logged, then step 5 again from the checkpoint (same batch 4, same loss) on to step 8
    logged = [(r["step"], r["loss"]) for r in history if "loss" in r]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 5, 6, 7, 8] and logged[4] == logged[5]
    assert np.isfinite([loss for _, loss in logged]).all()
    # the data position in the last checkpoint counts the left-out batch as consumed
    meta = json.loads((tmp_path / "ckpt" / str(STEPS) / "meta" / "metadata").read_text())
    assert meta["samples"] == (STEPS + 1) * 8 and saver.steps()[-1] == STEPS
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rollback[0] in records


def test_checkpoints_taken_after_the_bad_step_are_set_aside(tmp_path):
    # steps on batches 5 and 6 are skipped in place (the state stays finite), so checkpoint 6 is written
    # before the streak of two is seen (at step 7, before its save); the rollback goes to checkpoint 5 and
    # moves 6 to rejected/
    cfg = config(every=1)
    run, history, _, _ = trained(tmp_path, cfg, bad={5, 6}, mode="skip")
    assert [r["rollback_to"] for r in history if "rollback_to" in r] == [5]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "ckpt" / ckpt.REJECTED).iterdir()) == ["6"]
    assert_same(run.state, control(cfg, [0, 1, 2, 3, 4, 7, 8, 9]).state)


def test_a_streak_of_skipped_steps_rolls_back_past_all_of_them(tmp_path):
    cfg = config()  # precision.max_consecutive_skips=2
    run, history, _, _ = trained(tmp_path, cfg, bad={5, 6}, mode="skip")
    rollback = [r for r in history if "rollback_to" in r]
    assert rollback[0]["rollback_to"] == 4 and rollback[0]["skipped_batches"] == [5, 6]
    assert "2 non-finite steps in a row up to step 7" in rollback[0]["reason"]
    assert_same(run.state, control(cfg, [0, 1, 2, 3, 4, 7, 8, 9]).state)


def test_rollbacks_are_bounded(tmp_path):
    with pytest.raises(train.TrainingError, match=r"checkpoint\.max_rollbacks = 0"):
        trained(tmp_path, config(max_rollbacks=0), bad={5})


def test_without_an_earlier_checkpoint_there_is_nothing_to_roll_back_to(tmp_path):
    with pytest.raises(train.TrainingError, match=r"holds no good checkpoint from before it"):
        trained(tmp_path, config(every=100), bad={2})


def test_rollback_needs_a_checkpoint_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"rollback_on_nonfinite.*needs checkpoints"):
        train.train(config(), None, progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"max_rollbacks"):
        CheckpointConfig(max_rollbacks=-1)
