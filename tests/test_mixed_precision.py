"""Mixed precision in training: skipped non-finite steps across replicas, recovery from a huge loss
scale, and bf16 / fp16 tracking fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax import data as data_lib
from dsjax.config import Config, DataConfig, MeshConfig, ModelConfig, PipelineConfig, PrecisionConfig, TrainConfig
from dsjax.optim import make_optimizer, schedule
from dsjax.precision import loss_scale_from_config
from dsjax.step import make_train_step, next_token_loss
from dsjax.train import batch_at, build, main

# pipelined steps loaded back from the compilation cache can deadlock on simulated devices (conftest.py)
pytestmark = pytest.mark.usefixtures("no_compilation_cache")

MODEL = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)
POISON = 255  # a row whose first token is this gets an infinite loss term (only in the poisoned test)


def config(policy: str, steps: int, mesh: MeshConfig | None = None, **precision) -> Config:
    return Config(
        model=MODEL,
        mesh=mesh or MeshConfig(fsdp=1),
        data=DataConfig(source="default"),
        train=TrainConfig(steps=steps, batch_size=16, seq_len=32, lr=3e-3, warmup_steps=5),
        precision=PrecisionConfig(policy=policy, **precision),
    )


def train(cfg: Config, devices, steps: int):
    run = build(cfg, devices=devices)
    history = []
    for step in range(steps):
        run.state, metrics = run.train_step(run.state, batch_at(run, run.train_samples, step))
        history.append({k: v.item() for k, v in jax.device_get(metrics).items()})  # block every step
    return run, history


def poisoned(logits, batch):
    """The usual loss plus an infinite term for rows starting with POISON; finite elsewhere, including in
    the gradient (the weight is a constant 0 on clean rows, so no 0 * inf appears)."""
    weight = jnp.where(batch[:, 0] == POISON, jnp.inf, 0.0)
    return next_token_loss(logits, batch) + jnp.sum(weight[:, None, None] * logits.astype(jnp.float32))


def test_inf_in_one_replica_makes_every_replica_skip_the_same_step():
    cfg = config("fp16", steps=4, mesh=MeshConfig(data=4, fsdp=1))
    devices = jax.devices()[:4]
    run = build(cfg, devices=devices)
    step_fn = make_train_step(
        run.graphdef,
        make_optimizer(cfg.train),
        schedule(cfg.train),
        run.mesh,
        run.shardings,
        run.batch_sharding,
        loss_scale_from_config(cfg.precision),
        objective=poisoned,
    )
    k = 2
    for step in range(k):
        run.state, _ = step_fn(run.state, batch_at(run, run.train_samples, step))
    before = jax.device_get((nnx.to_pure_dict(run.state.params), run.state.opt_state))
    scale_before = float(run.state.loss_scale.scale)

    rows = data_lib.host_batch(run.train_samples, k, 16)
    rows[8:12, 0] = POISON  # rows 8..11: the third of four data-parallel replicas only
    batch = jax.device_put(rows, run.batch_sharding)
    holders = {s.device for s in batch.addressable_shards if (np.asarray(s.data)[:, 0] == POISON).any()}
    assert len(holders) == 1  # the inf really starts on one replica

    run.state, metrics = step_fn(run.state, batch)
    after = jax.device_get((nnx.to_pure_dict(run.state.params), run.state.opt_state))
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit: params and Adam state untouched
    ls = run.state.loss_scale
    assert float(ls.scale) == scale_before * 0.5 and int(ls.skipped_steps) == 1 and int(ls.consecutive_skips) == 1
    # every device holds the same decision (the state is replicated, and all copies agree)
    assert {float(s.data) for s in ls.scale.addressable_shards} == {scale_before * 0.5}
    assert not np.isfinite(float(metrics["loss"]))

    run.state, metrics = step_fn(run.state, batch_at(run, run.train_samples, k + 1))  # a clean step applies
    changed = jax.device_get(nnx.to_pure_dict(run.state.params))
    assert np.isfinite(float(metrics["loss"])) and int(run.state.loss_scale.consecutive_skips) == 0
    pairs = zip(jax.tree.leaves(changed), jax.tree.leaves(before[0]), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)


def test_a_huge_initial_scale_backs_off_then_trains():
    cfg = config("fp16", steps=40, init_scale=2.0**40, max_consecutive_skips=60)
    run, history = train(cfg, jax.devices()[:1], 40)
    runs = [h["consecutive_skips"] for h in history]
    first = runs.index(0)  # 2^40 overflows fp16 gradients at first: the opening steps are skipped in a row
    assert first >= 5 and runs[:first] == [*range(1, first + 1)]
    skipped = history[-1]["skipped_steps"]
    assert skipped - first <= 3  # afterwards at most a borderline overflow or two while the scale settles
    assert history[-1]["loss_scale"] == 2.0**40 * 0.5**skipped  # only back-offs (growth_interval is 2000)
    trained = [h["loss"] for h in history if h["consecutive_skips"] == 0]
    assert all(np.isfinite(trained)) and trained[-1] < trained[0] - 0.5
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in moments)  # no NaN ever reached Adam


STEPS = 50


@pytest.fixture(scope="module")
def fp32_losses():
    return [h["loss"] for h in train(config("fp32", STEPS), jax.devices()[:1], STEPS)[1]]


# Tolerances on the largest per-step gap between the loss curves, against ~2.7 nats of learning. Rounding
# is relative 2^-9 per operation in bf16 (8 significant bits) and 2^-12 in fp16 (11 bits); with fp32
# master weights the error does not accumulate across steps, so bf16 and fp16 stay within a few
# thousandths of fp32 (measured 0.0058 and 0.0006 with jax 0.10.2) and get bounds of 3-8x that. pure-bf16
# also rounds every weight update to 8 bits, so its curve drifts (measured 0.038) and gets 0.1. The
# pipelined cases run the same model as 2 stages on 2 devices under the same bounds: bf16 through GPipe
# (autodiff of the stage loop; measured 0.0046) and fp16 through 1F1B, whose hand-written backward pass
# starts from the loss scale (measured 0.0004).
@pytest.mark.parametrize(
    "policy, max_gap, schedule",
    [
        ("bf16", 0.02, None),
        ("fp16", 0.005, None),
        ("pure-bf16", 0.1, None),
        ("bf16", 0.02, "gpipe"),
        ("fp16", 0.005, "1f1b"),
    ],
)
def test_low_precision_tracks_fp32(fp32_losses, policy, max_gap, schedule):
    cfg = config(policy, STEPS)
    if schedule is not None:
        cfg = cfg.replace(
            mesh=MeshConfig(pipeline=2, fsdp=1), pipeline=PipelineConfig(schedule=schedule, microbatches=4)
        )
    losses = [h["loss"] for h in train(cfg, jax.devices()[: cfg.mesh.pipeline], STEPS)[1]]
    gaps = np.abs(np.array(losses) - np.array(fp32_losses))
    assert fp32_losses[0] - fp32_losses[-1] > 1.5  # fp32 itself learned
    assert gaps.max() < max_gap, (policy, gaps.max())


def test_training_stops_after_too_many_skips_in_a_row(capsys, tmp_path):
    args = [f"--out={tmp_path / 'run'}", "--precision.policy=fp16", "--precision.init_scale=1e30",
            "--precision.max_consecutive_skips=3", "--train.steps=10", "--train.batch_size=8", "--train.seq_len=32",
            "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=2",
            "--model.d_ff=64"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row, up to step 3" in err
    assert "the last finite step was 0" in err and "precision.max_consecutive_skips = 3" in err
    assert "Traceback" not in err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines  # what was measured before the stop is kept
