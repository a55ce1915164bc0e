"""Checkpoints across real processes (fp32, the tiny preset made smaller):

- kill -9 after the first checkpoint is finalized, then the same command: the final state is bit-identical
  to an uninterrupted run's, and so is every training loss logged after the restore point;
- kill -9 while an asynchronous save is in flight: the resume comes from the latest checkpoint that was
  complete (valid manifest) at the kill, never from the unfinished one, and ends bit-identical;
- SIGTERM: exit 75 with a finalized checkpoint at the step where it stopped, and an exact resume; the same
  command after the last step changes nothing;
- a checkpoint saved on 8 devices (data 2 x fsdp 2 x tensor 2) restored in fresh processes with 4 devices
  (fsdp 4) and with 1: bit-equal arrays, the shardings the target run wants, and the same next 5 steps as a
  control run on that mesh started from the same values;
- the data position across a kill and a resume with a larger global batch: no sample repeated or skipped;
  a global batch that does not divide the samples consumed is refused (exit 2) before training;
- an async checkpoint gets its manifest once Orbax has finalized it, without waiting for the next save.

Every `python -m dsjax.train` subprocess runs the same command (only --out and, for the data-position
resumes, --train.batch_size differ). One module fixture starts them in two waves (the interrupted runs
beside the uninterrupted reference, then every resume), with a shared persistent compilation cache: on a
2-core machine each process would otherwise spend ~10 s compiling the same programs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training import SMALL_FLAGS

from dsjax import checkpoint as ckpt
from dsjax import data as data_lib
from dsjax import train
from dsjax.config import Config, apply_overrides, preset
from dsjax.state import TrainState

REPO = pathlib.Path(__file__).resolve().parent.parent

STEPS = 24
EVERY = 4
BATCH = 8
COMMON = [
    *SMALL_FLAGS,
    f"--train.batch_size={BATCH}",
    f"--train.steps={STEPS}",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.sample_tokens=0",
    f"--checkpoint.every={EVERY}",
    "--checkpoint.keep=100",  # keep every checkpoint: the tests inspect the early ones after the resume
    "--checkpoint.async_save=true",
]
TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # Orbax's name for a save still being written
PREEMPTED = re.compile(r"stopped after step (\d+), saved checkpoint (.+?)\. Run the same command")
TIMEOUT = 300


def cli_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def command(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsjax.train", f"--out={out}", *COMMON, *extra]


# ----------------------------------------------------------------------------------------------------
# Helpers: run directories, metrics and checkpoints


def records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(recs: list[dict]) -> dict[int, float]:
    """step -> loss of the last training record of each step (a killed run may have logged steps that the
    resumed run logs again)."""
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def restored_from(recs: list[dict]) -> list[pathlib.Path]:
    return [pathlib.Path(r["restored_from"]) for r in recs if "restored_from" in r]


@dataclasses.dataclass
class PostMortem:
    """A run directory as a killed process left it, inspected before anything resumes it."""

    good: list[int]  # checkpoints whose manifest matches their files
    unfinished: list[str]  # Orbax temporary directories and checkpoints without a valid manifest
    logged: list[int]  # training steps in metrics.jsonl


def logged_steps(out: pathlib.Path) -> list[int]:
    """Training steps in metrics.jsonl; a line being written by a live process is skipped."""
    path, steps = out / "metrics.jsonl", set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            steps.add(record["step"])
    return sorted(steps)


def post_mortem(out: pathlib.Path) -> PostMortem:
    good, unfinished = [], []
    ckpts = out / "checkpoints"
    for path in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if path.name.isdigit() and ckpt.verify(path) is None:
            good.append(int(path.name))
        elif path.name.isdigit() or TMP_DIR.match(path.name):
            unfinished.append(path.name)
    return PostMortem(sorted(good), unfinished, logged_steps(out))


def step_dirs(out: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def meta_of(step_dir: pathlib.Path) -> dict:
    return json.loads((step_dir / "meta" / "metadata").read_text())


_TARGETS: dict[str, object] = {}


def load(step_dir: pathlib.Path, scratch: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a checkpoint as numpy (read with Checkpointer.restore onto one device) and its meta."""
    config = Config.from_dict(meta_of(step_dir)["config"])
    key = json.dumps(config.model.__dict__, sort_keys=True, default=str)
    if key not in _TARGETS:  # shapes and shardings only: nothing is initialised
        _TARGETS[key] = train.build(config, devices=jax.devices()[:1], abstract=True).state
    cfg = dataclasses.replace(config.checkpoint, restore=str(step_dir))
    restored = ckpt.Checkpointer(scratch, cfg, log=lambda _: None).restore(_TARGETS[key])
    assert restored is not None and restored.path == step_dir, restored
    flat = {k: np.asarray(jax.device_get(v)) for k, v in ckpt.flatten(restored.state).items()}
    return flat, restored.meta


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want), what
    assert any(k.startswith("opt_state") for k in want) and any(k.startswith("params") for k in want)
    different = [k for k in want if got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()]
    assert not different, f"{what}: {len(different)} arrays differ from the uninterrupted run's, e.g. {different[:5]}"


# ----------------------------------------------------------------------------------------------------
# The subprocesses: one fixture starts them all, in two waves


@dataclasses.dataclass
class Job:
    out: pathlib.Path
    argv: list[str]
    trigger: object = None  # callable(out) -> bool: when to send `sig`
    sig: int | None = None
    after: object = None  # callable() -> bool: start only once it holds
    env: dict | None = None
    proc: subprocess.Popen | None = None
    fired_at_step: int | None = None  # last logged training step when the signal was sent
    post: PostMortem | None = None
    rc: int | None = None
    log: pathlib.Path | None = None

    def start(self) -> None:
        n = len(list(self.out.parent.glob(f"{self.out.name}.*.log")))
        self.log = self.out.parent / f"{self.out.name}.{n}.log"
        with self.log.open("w") as f:  # a file, not a pipe: an unread pipe would block the child
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env or cli_env(), stdout=f, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text()


def manifest_of(step: int):
    return lambda out: (out / "checkpoints" / str(step) / ckpt.MANIFEST).is_file()


def manifest_and_step(step: int, logged: int):
    """Checkpoint `step` has its manifest and training has logged step `logged`."""
    return lambda out: manifest_of(step)(out) and max(logged_steps(out), default=0) >= logged


def save_in_flight(min_step: int):
    """An Orbax temporary directory of a save of step >= min_step exists (the save has begun, not finished)."""

    def trigger(out: pathlib.Path) -> bool:
        try:
            names = os.listdir(out / "checkpoints")
        except FileNotFoundError:
            return False
        return any((m := TMP_DIR.match(n)) and int(m.group(1)) >= min_step for n in names)

    return trigger


def drive(jobs: dict[str, Job]) -> None:
    """Start the jobs (each once its `after` holds), send each its signal as soon as its trigger holds, and
    wait for all of them. A job killed by SIGKILL is inspected (post mortem) right away, before anything
    else touches its directory."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(job.rc is None for job in jobs.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"subprocesses still running after {TIMEOUT} s: {jobs}")
            for job in jobs.values():
                if job.proc is None:
                    if job.after is None or job.after():
                        job.start()
                    continue
                if job.rc is not None:
                    continue
                if job.sig is not None and job.fired_at_step is None and job.trigger(job.out):
                    job.proc.send_signal(job.sig)
                    job.fired_at_step = max(logged_steps(job.out), default=0)
                    if job.sig == signal.SIGKILL:
                        job.proc.wait()
                rc = job.proc.poll()
                if rc is not None:
                    job.rc = rc
                    job.post = post_mortem(job.out) if job.out.is_dir() else None
            time.sleep(0.002)
    finally:
        for job in jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # One persistent compilation cache for these processes: they compile the same programs, so all but the
    # first load the executables the reference compiled (~6 s less each; the same executable either way).
    env = {
        **cli_env(),
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def job(name: str, *extra: str, **kwargs) -> Job:
        return Job(root / name, command(root / name, *extra), env=env, **kwargs)

    reference = job("reference")
    compiled = lambda: bool(logged_steps(reference.out))  # noqa: E731 (the reference is training)
    first = {
        "reference": reference,
        "kill": job("kill", trigger=manifest_and_step(EVERY, EVERY + 2), sig=signal.SIGKILL, after=compiled),
        "in_flight": job("in_flight", trigger=save_in_flight(3 * EVERY), sig=signal.SIGKILL, after=compiled),
        "term": job("term", trigger=manifest_of(EVERY), sig=signal.SIGTERM, after=compiled),
    }
    drive(first)
    # The data-position resumes work on copies of the killed run, taken before anything resumed it.
    kill = first["kill"]
    consumed = max(kill.post.good, default=0) * BATCH if kill.post else 0  # in the checkpoint a resume picks
    bad = next((b for b in (12, 20, 24, 28, 36, 40, 44) if consumed % b), 12)
    for name in ("kill_batch16", "kill_bad_batch"):
        shutil.copytree(kill.out, root / name)
    kill_bad_before = {p: (root / "kill_bad_batch" / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
    shutil.copytree(reference.out, root / "finished")  # a run that completed, run again
    second = {name: job(name) for name, done in first.items() if name != "reference" and done.rc != 0}
    second["kill_batch16"] = job("kill_batch16", "--train.batch_size=16")
    second["kill_bad_batch"] = job("kill_bad_batch", f"--train.batch_size={bad}")
    second["finished"] = job("finished")
    drive(second)
    return {
        "first": first,
        "second": second,
        "bad_batch": bad,
        "kill_bad_before": kill_bad_before,
        "scratch": root / "scratch",
    }


def interrupted(runs, name: str, sig: int) -> tuple[Job, Job]:
    """(the interrupted job, its resume), checking that the signal arrived while it was training."""
    job = runs["first"][name]
    assert job.fired_at_step is not None, f"the run ended (exit {job.rc}) before the signal:\n{job.text()[-3000:]}"
    assert job.rc == (-signal.SIGKILL if sig == signal.SIGKILL else ckpt.PREEMPTED_EXIT_CODE), job.text()[-3000:]
    resume = runs["second"][name]
    assert resume.rc == 0, resume.text()[-3000:]
    return job, resume


def assert_resumed_exactly(runs, job: Job, resume: Job, restore_step: int) -> None:
    """Final state and every loss logged after the restore point equal the uninterrupted run's."""
    reference = runs["first"]["reference"]
    assert reference.rc == 0, reference.text()[-3000:]
    recs = records(job.out)
    assert restored_from(recs) == [job.out / "checkpoints" / str(restore_step)]
    want_losses, got_losses = train_losses(records(reference.out)), train_losses(recs)
    assert sorted(want_losses) == sorted(got_losses) == list(range(1, STEPS + 1))
    after = [s for s in range(restore_step + 1, STEPS + 1) if got_losses[s] != want_losses[s]]
    assert not after, f"losses differ from the uninterrupted run's at steps {after}"
    scratch = runs["scratch"]
    want, want_meta = load(reference.out / "checkpoints" / str(STEPS), scratch)
    got, got_meta = load(job.out / "checkpoints" / str(STEPS), scratch)
    assert got_meta["step"] == want_meta["step"] == STEPS and got_meta["samples"] == want_meta["samples"]
    assert int(got["step"]) == STEPS
    assert_bit_identical(got, want, f"{job.out.name} after resuming from step {restore_step}")
    # and it did not merely restore the end: the restore point's state differs from the final one
    start, _ = load(job.out / "checkpoints" / str(restore_step), scratch)
    assert start["params.embed.value"].tobytes() != got["params.embed.value"].tobytes()


# ----------------------------------------------------------------------------------------------------
# 1. kill -9 between saves


def test_kill9_after_first_checkpoint_resumes_bit_identically(runs):
    job, resume = interrupted(runs, "kill", signal.SIGKILL)
    post = job.post
    assert EVERY in post.good, post
    assert max(post.logged) >= EVERY + 2, f"killed before training went past the checkpoint: {post}"
    restore_step = max(post.good)
    assert restore_step < STEPS
    assert f"restored {job.out / 'checkpoints' / str(restore_step)} (step {restore_step}" in resume.text()
    assert_resumed_exactly(runs, job, resume, restore_step)
    # the killed run's own records beyond the restore point (logged again after the resume) agree too
    reference = train_losses(records(runs["first"]["reference"].out))
    before_kill = {}
    for r in records(job.out):
        if "restored_from" in r:
            break
        if "loss" in r:
            before_kill[r["step"]] = r["loss"]
    assert before_kill and all(reference[s] == loss for s, loss in before_kill.items())


# ----------------------------------------------------------------------------------------------------
# 2. kill -9 while an asynchronous save is being written


def test_kill9_during_async_save_resumes_from_last_complete_checkpoint(runs):
    job, resume = interrupted(runs, "in_flight", signal.SIGKILL)
    post = job.post
    # the kill left at least one unfinished save behind (the Orbax temporary directory it was writing, or
    # a finalized directory whose manifest was not written yet)
    assert post.unfinished, f"no save was in flight at the kill: {post}"
    assert post.good, f"no complete checkpoint to resume from: {post}"
    unfinished_steps = {int(re.match(r"\d+", name).group()) for name in post.unfinished}
    restore_step = max(post.good)
    assert restore_step < max(unfinished_steps), (post, unfinished_steps)
    text = resume.text()
    for name in post.unfinished:
        if name.isdigit():  # a finalized checkpoint without a manifest: reported and set aside, not restored
            assert f"checkpoint {job.out / 'checkpoints' / name} is unusable" in text, text[-3000:]
            assert list((job.out / "checkpoints" / ckpt.REJECTED).glob(f"{name}-*")), name
    assert_resumed_exactly(runs, job, resume, restore_step)
    ckpts = job.out / "checkpoints"
    assert not [p for p in ckpts.iterdir() if TMP_DIR.match(p.name)], "Orbax temporary directories left behind"
    for step in step_dirs(job.out):
        assert ckpt.verify(ckpts / str(step)) is None, step


# ----------------------------------------------------------------------------------------------------
# 3. SIGTERM


def test_sigterm_saves_exits_75_and_resumes_exactly(runs):
    job, resume = interrupted(runs, "term", signal.SIGTERM)
    text = job.text()
    match = PREEMPTED.search(text)
    assert match, text[-3000:]
    stopped = int(match.group(1))
    where = pathlib.Path(match.group(2))
    assert where == job.out / "checkpoints" / str(stopped)
    assert job.fired_at_step <= stopped < STEPS
    assert ckpt.verify(where) is None, ckpt.verify(where)  # finalized: manifest present and matching
    assert stopped in job.post.good and max(job.post.good) == stopped, job.post
    assert not job.post.unfinished, job.post
    meta = meta_of(where)
    assert meta["step"] == stopped and meta["samples"] == stopped * BATCH
    assert job.post.logged == list(range(1, stopped + 1)), job.post  # every step it ran was logged
    assert_resumed_exactly(runs, job, resume, stopped)


def test_rerunning_a_finished_run_changes_nothing(runs):
    """The same command again after the run ended (what a scheduler may do after a SIGTERM that arrived
    during the last step) restores the final checkpoint and exits 0 without compiling, training, evaluating
    or writing anything."""
    reference, again = runs["first"]["reference"], runs["second"]["finished"]
    assert again.rc == 0, again.text()[-3000:]
    assert "the run is already complete" in again.text()
    assert records(again.out) == records(reference.out)
    assert step_dirs(again.out) == step_dirs(reference.out)
    final, original = (out / "checkpoints" / str(STEPS) for out in (again.out, reference.out))
    assert (final / ckpt.MANIFEST).read_bytes() == (original / ckpt.MANIFEST).read_bytes()
    assert ckpt.verify(final) is None


# ----------------------------------------------------------------------------------------------------
# 6. Data position across a kill and a resume with another global batch


def test_resume_with_larger_batch_consumes_every_sample_once(runs):
    kill = runs["first"]["kill"]
    assert kill.post is not None and kill.post.good, kill.post
    restore_step = max(kill.post.good)
    resume = runs["second"]["kill_batch16"]
    assert resume.rc == 0, resume.text()[-3000:]
    out = resume.out
    checkpoint = out / "checkpoints" / str(restore_step)
    recs = records(out)
    assert restored_from(recs) == [checkpoint]
    consumed = meta_of(checkpoint)["samples"]
    assert consumed == restore_step * BATCH and meta_of(checkpoint)["batch_size"] == BATCH

    # The resumed process's own account: its last checkpoint is the first one's samples plus 16 a step.
    final = meta_of(out / "checkpoints" / str(STEPS))
    assert final["batch_size"] == 16 and final["samples"] == consumed + 16 * (STEPS - restore_step)

    # The Python API: restoring with batch 16 sets the offset so that the next batch starts at sample
    # `consumed`, and the global sample indices consumed are those of an uninterrupted run, in order.
    config = Config.from_dict(json.loads((out / "config.json").read_text()))
    assert config.train.batch_size == 16
    config = apply_overrides(config, {"checkpoint.restore": str(checkpoint)})
    run16 = train.build(config, devices=jax.devices()[:1])
    restored = train.restore(run16, ckpt.Checkpointer(runs["scratch"], config.checkpoint), log=lambda _: None)
    assert restored.path == checkpoint and int(run16.state.step) == restore_step
    assert run16.batch_offset == consumed // 16 - restore_step
    before = [i for s in range(restore_step) for i in range(s * BATCH, (s + 1) * BATCH)]  # batch 8, offset 0
    after = [(s + run16.batch_offset) * 16 + r for s in range(restore_step, STEPS) for r in range(16)]
    assert before + after == list(range(consumed + 16 * (STEPS - restore_step)))
    # ... and the batches hold exactly the uninterrupted run's samples: batch s of the resumed run is
    # batches 2(s + offset) and 2(s + offset) + 1 of batch 8
    samples = run16.train_samples
    for s in range(restore_step, STEPS):
        got = np.asarray(jax.device_get(train.batch_at(run16, samples, s + run16.batch_offset)))
        j = s + run16.batch_offset
        want = np.concatenate([data_lib.host_batch(samples, 2 * j + k, BATCH) for k in (0, 1)])
        assert np.array_equal(got, want), s

    # The subprocess trained on that batch: its loss at the first resumed step is the restored state's
    # loss on samples consumed..consumed+15, not on a batch that skips or repeats samples.
    def first_loss(index: int) -> float:
        state = jax.tree.map(jnp.copy, run16.state)
        _, metrics = run16.train_step(state, train.batch_at(run16, samples, index))
        return float(metrics["loss"])

    logged = train_losses(recs)[restore_step + 1]
    expected = first_loss(restore_step + run16.batch_offset)
    assert logged == expected  # same program, same values, same batch: bit-equal
    for wrong in (restore_step, restore_step + run16.batch_offset - 1):  # offset 0 skips, -1 repeats
        assert first_loss(wrong) != logged, wrong


def test_resume_with_batch_not_dividing_samples_fails_before_training(runs):
    kill = runs["first"]["kill"]
    restore_step = max(kill.post.good)
    consumed = restore_step * BATCH
    bad = runs["bad_batch"]
    job = runs["second"]["kill_bad_batch"]
    assert consumed % bad
    assert job.rc == 2, job.text()[-3000:]
    text = job.text()
    for fragment in (
        f"was taken after {consumed} samples",
        f"(step {restore_step}, global batch {BATCH})",
        f"train.batch_size={bad} does not divide that",
    ):
        assert fragment in text, text[-3000:]
    assert "Traceback" not in text
    # nothing trained, logged or saved
    for name, before in runs["kill_bad_before"].items():
        assert (job.out / name).read_bytes() == before, name
    at_kill = sorted(kill.post.good + [int(n) for n in kill.post.unfinished if n.isdigit()])
    assert step_dirs(job.out) == [s for s in at_kill if s <= restore_step]  # newer, unusable ones set aside


# ----------------------------------------------------------------------------------------------------
# 4. Save on 8 devices (data 2 x fsdp 2 x tensor 2), restore in fresh processes with 4 devices and 1

RESHARD_MODEL = {
    "model.n_layers": "1",
    "model.d_model": "32",
    "model.n_heads": "4",
    "model.n_kv_heads": "2",
    "model.d_ff": "64",
    "model.vocab_size": "256",
    "train.seq_len": "32",
    "train.batch_size": "8",
    "train.log_every": "1",
    "train.eval_every": "0",
    "train.eval_batches": "1",
    "train.sample_tokens": "0",
}
RESHARD_STEPS = 6
NEXT = 5

RESTORE_SCRIPT = r"""
import json, sys
n_devices, step_dir, truth_path, config_path, out, n_next = int(sys.argv[1]), *sys.argv[2:6], int(sys.argv[6])
from dsjax.mesh import simulate_cpu_devices
simulate_cpu_devices(n_devices)  # before JAX initialises a backend
import jax, numpy as np
from dsjax import checkpoint as ckpt, train
from dsjax.config import Config, apply_overrides

config = Config.from_dict(json.load(open(config_path)))
config = apply_overrides(
    config, {"mesh.data": "1", "mesh.fsdp": "-1", "mesh.tensor": "1", "checkpoint.restore": step_dir}
)
run = train.build(config, abstract=True)  # run.state: the shapes and the shardings this mesh wants
assert len(run.mesh.devices.flat) == n_devices
wanted = {k: v.sharding for k, v in ckpt.flatten(run.state).items()}
template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.state)
restored = train.restore(run, ckpt.Checkpointer(out + "/scratch", config.checkpoint))
flat = ckpt.flatten(run.state)
shardings = {
    k: {
        "restored": str(v.sharding.spec),
        "wanted": str(wanted[k].spec),
        "equal": v.sharding == wanted[k],
        "mesh": dict(v.sharding.mesh.shape),
        "devices": [d.id for d in v.sharding.mesh.devices.flat],
        "wanted_devices": [d.id for d in wanted[k].mesh.devices.flat],
    }
    for k, v in flat.items()
}
np.savez(out + "/restored.npz", **{k: np.asarray(jax.device_get(v)) for k, v in flat.items()})
json.dump(shardings, open(out + "/shardings.json", "w"))  # before training, which needs them right

def next_steps(state):
    losses, start = [], int(jax.device_get(state.step))
    for s in range(start, start + n_next):
        state, metrics = run.train_step(state, train.batch_at(run, run.train_samples, s + run.batch_offset))
        losses.append(float(metrics["loss"]))  # blocks every step (BENCHMARKS.md: CPU meshes)
    return state, losses

after, losses = next_steps(run.state)
truth = np.load(truth_path)
control = ckpt.unflatten(template, {k: jax.device_put(truth[k], wanted[k]) for k in truth.files})
control_after, control_losses = next_steps(control)
np.savez(out + "/after.npz", **{k: np.asarray(jax.device_get(v)) for k, v in ckpt.flatten(after).items()})
np.savez(out + "/control.npz", **{k: np.asarray(jax.device_get(v)) for k, v in ckpt.flatten(control_after).items()})
json.dump(
    {
        "mesh": run.degrees,
        "batch_offset": run.batch_offset,
        "restored_path": str(restored.path),
        "losses": losses,
        "control_losses": control_losses,
    },
    open(out + "/result.json", "w"),
)
"""


def test_checkpoint_from_8_devices_restores_onto_4_and_1(tmp_path):
    config = apply_overrides(
        preset("tiny"),
        {
            **RESHARD_MODEL,
            "train.steps": str(RESHARD_STEPS),
            "mesh.data": "2",
            "mesh.fsdp": "2",
            "mesh.tensor": "2",
            "checkpoint.every": "0",
        },
    )
    assert config.precision.policy == "fp32"
    source = tmp_path / "source"
    run, _ = train.train(config, source, progress=False, log=lambda _: None)  # the test process has 8 devices
    assert run.degrees == {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}
    step_dir = source / "checkpoints" / str(RESHARD_STEPS)
    assert ckpt.verify(step_dir) is None
    meta = meta_of(step_dir)
    assert meta["mesh"] == run.degrees and meta["devices"] == 8
    source_flat = ckpt.flatten(run.state)
    truth = {k: np.asarray(jax.device_get(v)) for k, v in source_flat.items()}
    source_specs = {k: str(v.sharding.spec) for k, v in source_flat.items()}
    assert any("tensor" in spec and "fsdp" in spec for spec in source_specs.values()), source_specs
    np.savez(tmp_path / "truth.npz", **truth)
    (tmp_path / "restore.py").write_text(RESTORE_SCRIPT)

    # the source mesh's own next steps, for comparison across meshes
    state, source_losses = run.state, []
    for s in range(RESHARD_STEPS, RESHARD_STEPS + NEXT):
        state, metrics = run.train_step(state, train.batch_at(run, run.train_samples, s))
        source_losses.append(float(metrics["loss"]))

    procs = {}
    for n in (4, 1):
        out = tmp_path / f"on{n}"
        out.mkdir()
        argv = [sys.executable, str(tmp_path / "restore.py"), str(n), str(step_dir), str(tmp_path / "truth.npz")]
        argv += [str(source / "config.json"), str(out), str(NEXT)]
        with (out / "log").open("w") as log:
            procs[n] = (subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT), out)
    try:
        for proc, _ in procs.values():
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for n, (proc, out) in procs.items():
        log = (out / "log").read_text()[-3000:]
        assert (out / "shardings.json").is_file(), log
        shardings = json.loads((out / "shardings.json").read_text())
        assert sorted(shardings) == sorted(truth)
        wrong = {k: s for k, s in shardings.items() if not s["equal"] or s["restored"] != s["wanted"]}
        assert not wrong, f"on {n} device(s), restored shardings differ from the target run's: {wrong}"
        assert all(s["devices"] == s["wanted_devices"] and len(s["devices"]) == n for s in shardings.values())
        if n == 4:  # a real re-layout: FSDP-split where the source also split over tensor
            assert any("fsdp" in s["restored"] for s in shardings.values())
            assert not any("tensor" in s["restored"] for s in shardings.values())
            assert any(s["restored"] != source_specs[k] for k, s in shardings.items())

        restored = dict(np.load(out / "restored.npz"))
        assert_bit_identical(restored, truth, f"restored on {n} device(s)")

        assert proc.returncode == 0, log
        result = json.loads((out / "result.json").read_text())
        assert result["mesh"] == {"data": 1, "pipeline": 1, "fsdp": n, "tensor": 1}
        assert result["restored_path"] == str(step_dir) and result["batch_offset"] == 0

        # the next steps equal a control run on this mesh started from the same values
        np.testing.assert_allclose(result["losses"], result["control_losses"], rtol=1e-5, atol=0)
        after, control = np.load(out / "after.npz"), np.load(out / "control.npz")
        assert sorted(after.files) == sorted(truth)
        for k in truth:
            np.testing.assert_allclose(after[k], control[k], rtol=1e-5, atol=1e-8, err_msg=k)
        assert int(after["step"]) == RESHARD_STEPS + NEXT
        # ... and follow the source mesh's trajectory (other reduction orders: fp32 rounding only)
        np.testing.assert_allclose(result["losses"], source_losses, rtol=1e-5, atol=0)
    # the steps really trained: losses change
    assert len(set(source_losses)) == NEXT


# ----------------------------------------------------------------------------------------------------
# An async checkpoint is verifiable as soon as Orbax has finalized it: without its manifest, a kill -9
# before the next save would resume from the checkpoint before (or, with checkpoint.keep=1, not at all).


def test_async_checkpoint_gets_its_manifest_without_another_save(tmp_path):
    cfg = apply_overrides(preset("tiny"), {"checkpoint.async_save": "true"}).checkpoint
    checkpointer = ckpt.Checkpointer(tmp_path / "ckpts", cfg, log=lambda _: None)
    state = TrainState(step=jnp.int32(1), params={"w": jnp.arange(4.0)}, opt_state=(), loss_scale=())
    step_dir = tmp_path / "ckpts" / "1"
    try:
        assert checkpointer.save(state, {"samples": 8})  # dsjax's wait() is not called: nothing else happens
        deadline = time.monotonic() + 10
        while ckpt.verify(step_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ckpt.verify(step_dir) is None, ckpt.verify(step_dir)
    finally:
        checkpointer.close()
