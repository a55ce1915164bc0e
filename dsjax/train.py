"""`python -m dsjax.train`: build a run from a config, train it, evaluate it, sample from it.

Usage: python -m dsjax.train [--preset=NAME] [--out=DIR] [--cpu-devices=N] [--dry-run]
                             [--section.field=value ...]

Everything is an importable function so notebooks and tests drive the same code: `build` (dsjax.run,
re-exported here with the rest of a Run's functions) makes a `Run` (mesh, data, sharded state, compiled
steps), `fit` trains it (checkpoints, rollbacks, the monitor), `evaluate` and `sample` use it, `train` does
all of it, and `main` only parses the command line and reports errors.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsjax import checkpoint as ckpt
from dsjax import distributed, memory, rundir, xla_flags
from dsjax.compiling import compilation_cache
from dsjax.config import Config, ConfigError, apply_overrides, help_text, preset, split_known
from dsjax.mesh import simulate_cpu_devices
from dsjax.monitor import Goodput, Monitor
from dsjax.run import (
    Run,
    _platform,
    abstract_state,
    batch_at,
    batches,
    build,
    compile_report,
    evaluate,
    indexed_batches,
    load_data,
    materialize,
    prepare,
    sample,
)

# The API notebooks and scripts use: the Run functions of dsjax.run, and training them.
__all__ = [
    "Preempted",
    "Run",
    "TrainingError",
    "abstract_state",
    "batch_at",
    "batches",
    "build",
    "checkpoint_meta",
    "compile_report",
    "evaluate",
    "fit",
    "indexed_batches",
    "load_data",
    "main",
    "materialize",
    "prepare",
    "restore",
    "sample",
    "train",
    "use_restored",
]

VALUE_FLAGS = ("preset", "out", "cpu-devices")
SWITCHES = ("dry-run", "help")
USAGE = (
    "usage: python -m dsjax.train [--preset=NAME] [--out=DIR] [--cpu-devices=N] [--dry-run] [--section.field=value ...]"
)


# Steps dispatched ahead of the one whose metrics the training loop reads (accelerators).
METRICS_LAG = 4


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row); the message names the steps."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; the message names it."""


class _NonFinite(Exception):
    """Raised inside `fit` when a step's loss was not finite or too many steps in a row were skipped."""

    def __init__(self, steps: list[int], reason: str):
        super().__init__(reason)
        self.steps, self.reason = steps, reason  # 0-based steps whose batches are to blame


def fit(
    run: Run,
    out: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    compiled=None,
    checkpointer: ckpt.Checkpointer | None = None,
    preemption: ckpt.Preemption | None = None,
    monitor: Monitor | None = None,
) -> list[dict]:
    """Train `run.state` for train.steps; returns the logged records (also appended to out/metrics.jsonl).

    `compiled` is the step `prepare` returned (prepared here when not given). Batches come from
    `indexed_batches` (built and transferred ahead of the step that uses them), and each step's metrics
    are read only once `METRICS_LAG` later steps have been dispatched, so the device always has queued
    work and the host never waits on a step it just launched (one step on CPU, where many un-synced
    multi-device steps can trip an all-reduce rendezvous timeout; BENCHMARKS.md).

    With a `checkpointer`, the state is saved on its schedule and after the last step; with a
    `preemption` (which needs a checkpointer) whose signal arrived, it is saved at the next step boundary
    and Preempted is raised. With checkpoint.rollback_on_nonfinite, a step whose loss is not finite (or
    precision.max_consecutive_skips skipped steps in a row) restores the newest good checkpoint taken
    before it, and training goes on from there without the offending batch(es); each rollback is a
    record {"step", "rollback_to", "skipped_batches", "reason"}.

    Records go to the `monitor`'s sinks (one is made for `out` when not given: metrics.jsonl, TensorBoard,
    Prometheus, NVML and the advisor as run.config.monitor says); it also times the loop for goodput and
    runs the profile.steps trace.
    """
    t, c = run.config.train, run.config.checkpoint
    rollback = c.rollback_on_nonfinite
    if rollback and checkpointer is None:
        raise ConfigError(
            "checkpoint.rollback_on_nonfinite needs checkpoints to roll back to: give the run a directory "
            "(--out or --checkpoint.dir) and keep checkpoint.enabled=true."
        )
    if monitor is None:
        with Monitor(run.config, "" if out is None else out.name, log) as monitor:
            monitor.attach(out)
            return fit(run, out, progress, log, compiled, checkpointer, preemption, monitor)
    monitor.profile.check()
    goodput = monitor.goodput
    history: list[dict] = []

    def record(entry: dict) -> None:
        history.append(entry)
        monitor.write(entry)

    def timed_evaluate() -> float:
        with goodput.timed("eval"):
            return evaluate(run)

    compiled = compiled if compiled is not None else prepare(run, log)
    step0 = int(jax.device_get(run.state.step))
    goodput.end_setup()
    record({"step": step0, "eval_loss": timed_evaluate()})
    bar = tqdm(total=t.steps, initial=step0, disable=not progress, unit="step", dynamic_ncols=True)
    # A throughput window runs from one log step to the next on the device's clock: at each log step the
    # host waits for every step dispatched so far (one short pipeline drain per window), so a window
    # counts exactly the steps the device ran in it, however far ahead of the device the host was.
    window_start, window_first = time.perf_counter(), step0
    latest: list = [step0 - 1, None]  # (step, metrics) of the newest dispatched step
    lag = 1 if _platform(run) == "cpu" else METRICS_LAG
    max_skips = run.config.precision.max_consecutive_skips
    skip: set[int] = set()  # global batch indices left out after rollbacks
    rollbacks = 0

    def report(step: int, metrics) -> None:
        nonlocal window_start, window_first
        values = {k: v.item() for k, v in jax.device_get(metrics).items()}
        streak = values["consecutive_skips"]
        if rollback and not math.isfinite(values["loss"]):
            raise _NonFinite([step], f"the loss of step {step + 1} is {values['loss']}")
        if streak >= max_skips:
            if rollback:
                raise _NonFinite(
                    list(range(step + 1 - streak, step + 1)),
                    f"{streak} non-finite steps in a row up to step {step + 1}",
                )
            record({"step": step + 1, **values})
            raise TrainingError(
                f"{streak} non-finite steps in a row, up to step {step + 1} "
                f"(precision.max_consecutive_skips = {max_skips}); the last finite step was "
                f"{step + 1 - streak}. No step with non-finite gradients was applied. "
                "Lower train.lr, raise train.warmup_steps, use --precision.policy=bf16 if fp16 overflows in "
                "the forward pass, or roll back past such steps with --checkpoint.rollback_on_nonfinite=true."
            )
        if (step + 1) % t.log_every and step + 1 != t.steps:
            return
        jax.block_until_ready(latest[1])
        now = time.perf_counter()
        elapsed, window_steps = now - window_start, latest[0] + 1 - window_first
        if window_steps == 0:  # log steps closer together than METRICS_LAG: the last window counted these
            history.extend(monitor.training({"step": step + 1, **values}, (window_first + 1, window_first)))
            return
        tokens_per_sec = run.tokens_per_step * window_steps / elapsed
        mfu = [None if run.peak_flops is None else tokens_per_sec * f / run.peak_flops for f in run.flops_per_token]
        entry = {
            "step": step + 1,
            **values,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu[0],
            "mfu_causal": mfu[1],
            "step_time_s": elapsed / window_steps,
        }
        history.extend(monitor.training(entry, (window_first + 1, latest[0] + 1)))
        bar.set_postfix_str(
            f"loss {values['loss']:.3f}  tok/s {tokens_per_sec:,.0f}  "
            + ("MFU n/a" if mfu[0] is None else f"MFU {100 * mfu[0]:.1f}%")
        )
        window_start, window_first = now, latest[0] + 1

    several = jax.process_count() > 1

    def checks_due(step: int) -> bool:
        """Whether to ask about a stop signal and the checkpoint clock after `step`: every step in one process
        (local checks); in a job, where agreeing is a collective, at log steps only, where the loop waits
        for the device anyway."""
        return not several or (step + 1) % t.log_every == 0 or step + 1 == t.steps

    def train_from(first: int) -> None:
        """Steps first, ..., train.steps - 1, reporting each; raises _NonFinite (with rollback on)."""
        nonlocal window_start, window_first
        pending: collections.deque = collections.deque()
        indices = (i for i in itertools.count(first + run.batch_offset) if i not in skip)
        feed = indexed_batches(run, run.train_samples, itertools.islice(indices, t.steps - first))

        def drain() -> None:  # read every dispatched step's metrics (before a save, an eval, the end)
            while pending:
                report_pending(pending)

        # Building a batch costs the device time only when it has run everything dispatched so far.
        idle = lambda: latest[1] is None or latest[1]["loss"].is_ready()  # noqa: E731
        for step, (index, batch) in zip(
            range(first, t.steps), goodput.timed_iter(feed, "data_wait", idle), strict=True
        ):
            monitor.profile.before(step)
            run.state, metrics = compiled(run.state, batch)
            tracing = time.perf_counter()
            if (trace := monitor.profile.after(step, run.state)) is not None:
                window_start += time.perf_counter() - tracing  # writing the trace is not a training step
                log(f"profile: steps {monitor.profile.span[0]}-{step + 1} traced into {trace}")
                record({"step": step + 1, "profile": str(trace)})
            run.batch_offset = index - step  # the data position the next checkpoint records
            latest[:] = step, metrics
            pending.append((step, index, metrics))
            while len(pending) > lag:
                report_pending(pending)
            bar.update(1)
            if preemption is not None and checkpointer is not None and checks_due(step) and preemption.agreed():
                drain()
                with goodput.timed("checkpoint"):
                    saved = checkpointer.save(run.state, checkpoint_meta(run))
                    checkpointer.wait()
                if saved:
                    where = f"saved checkpoint {checkpointer.dir / str(step + 1)}"
                else:
                    where = "saved no checkpoint (the state is not finite)"
                why = f"{preemption.requested} received" if preemption.requested else "another process was signalled"
                raise Preempted(f"{why}: stopped after step {step + 1}, {where}.")
            if checkpointer is not None and not several:  # (handoffs run in single-process runs only)
                checkpointer.check()  # a save that failed in the background stops the run now, not at the next
            if checkpointer is not None and checkpointer.due(step + 1, clock=checks_due(step)) and step + 1 != t.steps:
                # Every step a checkpoint covers is in metrics.jsonl before the checkpoint can exist: a job
                # killed after the save resumes past these steps and would never log them again.
                drain()
                with goodput.timed("checkpoint"):
                    checkpointer.save(run.state, checkpoint_meta(run))
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 != t.steps:
                drain()
                record({"step": step + 1, "eval_loss": timed_evaluate()})
                window_start, window_first = time.perf_counter(), step + 1
        drain()

    recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=max_skips + 1)  # (step, batch index)

    def report_pending(pending: collections.deque) -> None:
        step, index, metrics = pending.popleft()
        recent.append((step, index))
        report(step, metrics)

    if checkpointer is not None and step0 < t.steps:
        checkpointer.warm_up(run.state)
    try:
        first = step0
        while True:
            try:
                train_from(first)
                break
            except _NonFinite as bad:
                rollbacks += 1
                if rollbacks > c.max_rollbacks:
                    raise TrainingError(
                        f"{bad.reason}, and this run has already rolled back checkpoint.max_rollbacks = "
                        f"{c.max_rollbacks} times; it is diverging, not hitting a bad batch. Lower train.lr, "
                        "raise train.warmup_steps or check the data."
                    ) from None
                blamed = sorted(index for step, index in recent if step in bad.steps)
                with goodput.timed("restart"):
                    first = _roll_back(run, checkpointer, bad.steps[0], log)
                monitor.redo_until = max(monitor.redo_until, bad.steps[-1] + 1)  # steps first+1.. run again
                skip.update(blamed)
                log(
                    f"warning: {bad.reason}: rolled back to the checkpoint of step {first} and will leave out "
                    f"global batch(es) {blamed} (rollback {rollbacks} of at most {c.max_rollbacks})."
                )
                record(
                    {"step": bad.steps[-1] + 1, "rollback_to": first, "skipped_batches": blamed, "reason": bad.reason}
                )
                recent.clear()
                bar.n = first
                bar.refresh()
                window_start, window_first = time.perf_counter(), first
                latest[:] = first - 1, None
        if checkpointer is not None:
            with goodput.timed("checkpoint"):
                checkpointer.save(run.state, checkpoint_meta(run))
                checkpointer.wait()
        record({"step": t.steps, "eval_loss": timed_evaluate()})
    finally:
        bar.close()
    log(
        f"eval loss: {history[0]['eval_loss']:.3f} at step {step0} -> {history[-1]['eval_loss']:.3f} "
        f"at step {t.steps} (nats/token)"
    )
    return history


def _roll_back(run: Run, checkpointer: ckpt.Checkpointer, bad_step: int, log: Callable[[str], None]) -> int:
    """Replace run.state by the newest good checkpoint taken before step `bad_step` (0-based) ran; returns
    its step. The current state's buffers are freed first, so the restore needs no second copy."""
    checkpointer.wait()  # saves still in flight finish first (any taken after bad_step are set aside)
    distributed.sync("rollback")  # process 0 has written every manifest: all processes choose alike
    target = abstract_state(run)
    jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, run.state)
    restored = checkpointer.restore_latest(target, at_most=bad_step)
    if restored is None:
        raise TrainingError(
            f"step {bad_step + 1} was not finite and checkpoint.rollback_on_nonfinite is on, but "
            f"{checkpointer.dir} holds no good checkpoint from before it (checkpoint.every = "
            f"{run.config.checkpoint.every}); nothing to roll back to."
        )
    use_restored(run, restored, log)
    return int(jax.device_get(run.state.step))


def checkpoint_meta(run: Run) -> dict:
    """What a checkpoint records beside the arrays: the data position (global samples consumed, so a run
    with another global batch can continue without repeating or skipping a sample), the mesh and the config."""
    step = int(jax.device_get(run.state.step))
    return {
        "step": step,
        "samples": (step + run.batch_offset) * run.config.train.batch_size,
        "batch_size": run.config.train.batch_size,
        "mesh": run.degrees,
        "devices": int(run.mesh.devices.size),
        "config": run.config.to_dict(),
    }


def restore(
    run: Run, checkpointer: ckpt.Checkpointer, log: Callable[[str], None] = print, max_step: int | None = None
) -> ckpt.Restored | None:
    """Replace run.state by the checkpoint that checkpoint.restore names (laid out for this run's mesh) and
    set the data position; None, leaving the run as built, when there is nothing to restore. The run may
    be built with abstract=True: the checkpoint is then read without ever initialising a state. A
    checkpoint past `max_step` (a run's train.steps) is a ConfigError, raised before it is read."""
    restored = checkpointer.restore(abstract_state(run), max_step=max_step)
    if restored is not None:
        use_restored(run, restored, log)
    return restored


def use_restored(run: Run, restored: ckpt.Restored, log: Callable[[str], None]) -> None:
    """Make a restored checkpoint the run's state and data position."""
    step, samples = int(jax.device_get(restored.state.step)), restored.meta["samples"]
    batch = run.config.train.batch_size
    if samples % batch:
        raise ConfigError(
            f"checkpoint {restored.path} was taken after {samples} samples (step {step}, global batch "
            f"{restored.meta['batch_size']}); train.batch_size={batch} does not divide that, so training "
            "could not continue without repeating or skipping samples. Use a global batch that divides "
            f"{samples}, e.g. {restored.meta['batch_size']}."
        )
    run.state, run.batch_offset = restored.state, samples // batch - step
    log(
        f"restored {restored.path} (step {step}, {samples} samples, saved on mesh {restored.meta['mesh']} over "
        f"{restored.meta['devices']} device(s))"
    )


def train(
    config: Config, out: str | Path | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> tuple[Run, list[dict]]:
    """Build and train a run; writes config.json, metrics.jsonl and checkpoints to `out` when given.

    A run directory that already holds a dsjax run is resumed from its latest good checkpoint
    (checkpoint.restore='auto'); otherwise it must be new or empty. The directory is created only once
    the step has compiled and passed the memory preflight, so a run rejected before training leaves
    nothing behind. SIGTERM / SIGINT save a checkpoint at the next step boundary and raise Preempted.
    A run that has already ended (its final checkpoint and evaluation on record) is restored and returned
    with an empty history: nothing is compiled, trained or written.
    """
    goodput = Goodput()
    c = config.checkpoint
    out = None if out is None else Path(out).expanduser()
    if out is not None:
        own = Path(c.dir).expanduser() if c.dir else out / "checkpoints"
        out_dir = rundir.check_out(out, resumable=c.enabled and c.restore != "none" and rundir.holds_checkpoints(own))
    else:
        out_dir = None
    distributed.sync("out-checked")  # no process may see another's files as an older run's
    directory = None
    if c.enabled and (c.dir or out_dir is not None):
        directory = Path(c.dir).expanduser() if c.dir else out_dir / "checkpoints"
        rundir.check_writable_dir(directory, "--checkpoint.dir" if c.dir else "the run's checkpoints directory")
    if c.rollback_on_nonfinite and directory is None:
        raise ConfigError(
            "--checkpoint.rollback_on_nonfinite=true needs checkpoints to roll back to: give the run a "
            "directory (--out or --checkpoint.dir) and keep checkpoint.enabled=true."
        )
    will_restore = directory is not None and (directory.exists() or c.restore not in ("auto", "none"))
    # The exporter's port is taken before anything slow, so a taken port fails the run at once.
    with Monitor(config, "" if out is None else Path(out).name, log, goodput) as monitor:
        if out_dir is None:
            monitor.profile.check()  # before anything is built
        return _train(config, out_dir, directory, will_restore, progress, log, monitor)


def _train(
    config: Config,
    out_dir: Path | None,
    directory: Path | None,
    will_restore: bool,
    progress: bool,
    log: Callable[[str], None],
    monitor: Monitor,
) -> tuple[Run, list[dict]]:
    c = config.checkpoint
    # A run that restores is built abstract and read straight from the checkpoint: no second copy of the
    # state is ever initialised.
    run = build(config, abstract=will_restore)
    log(f"data: {run.corpus.description if run.corpus else 'synthetic tokens'}")
    checkpointer, restored = None, None
    if will_restore:
        checkpointer = ckpt.Checkpointer(directory, c, log)
        try:
            with monitor.goodput.timed("restart"):  # reading the state back is time lost to the restart
                restored = restore(run, checkpointer, log, max_step=config.train.steps)
        except BaseException:
            checkpointer.close()
            raise
        materialize(run)  # nothing was restored: start from the initialisation

    if restored is not None:
        changed = rundir.changed_data_settings(restored.meta.get("config", {}), config)
        if changed:
            log(
                f"warning: resuming with data settings other than the checkpoint's ({', '.join(changed)}); the "
                "checkpoint fixes the model and the data position, so training goes on with these."
            )

    # A rerun of a finished run (its own checkpoint of step train.steps restored) trains and saves nothing.
    rerun = checkpointer is not None and checkpointer.last_saved == config.train.steps
    if rerun and _agree(rundir.finished(out_dir, config.train.steps)):
        # The same command again after the run ended: its final checkpoint and evaluation are the result, so
        # nothing is compiled, evaluated or written. (A run stopped between its last save and its final
        # evaluation goes on below: its rerun compiles and evaluates.)
        checkpointer.close()
        log(
            f"the run is already complete (step {checkpointer.last_saved} of train.steps={config.train.steps}): "
            "nothing to train; raise --train.steps to go on."
        )
        return run, []

    def open_outputs() -> None:  # once the step has compiled and passed the memory preflight
        if out_dir is None:
            return
        if distributed.is_primary():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(config.to_json() + "\n")
        monitor.redo_until = rundir.last_logged_step(out_dir) if restored is not None else 0
        monitor.attach(out_dir)
        if restored is not None:
            monitor.write({"step": int(jax.device_get(run.state.step)), "restored_from": str(restored.path)})

    if directory is not None and checkpointer is None:
        checkpointer = ckpt.Checkpointer(directory, c, log)
    if checkpointer is None:
        compiled = prepare(run, log)
        open_outputs()
        return run, fit(run, out_dir, progress, log, compiled, monitor=monitor)
    if not rerun:
        checkpointer.reserve_host_memory(run.state)  # beside the compilation, not beside the first steps
    try:
        compiled = prepare(run, log)
        checkpointer.wait_for_reservation()  # a step from the compilation cache can be ready first
        open_outputs()
        with ckpt.Preemption() as preemption:
            history = fit(run, out_dir, progress, log, compiled, checkpointer, preemption, monitor)
    except BaseException:
        try:  # finish and verify what was saved (if anything), but let the original error through
            checkpointer.close()
        except Exception as err:
            log(f"warning: {err}")
        raise
    checkpointer.close()
    return run, history


def _agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process of a job (each read the shared run directory for itself, and a
    file system's caches may show them different contents)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _parse(argv: Sequence[str]) -> tuple[Config, dict]:
    top, overrides = split_known(argv, VALUE_FLAGS, SWITCHES)
    name = top.get("preset") or "tiny"
    config = apply_overrides(preset(name), overrides)
    options = {
        "preset": name,
        "out": top.get("out"),
        "dry_run": "dry-run" in top,
        "help": "help" in top,
        "cpu_devices": None,
    }
    if "cpu-devices" in top:
        try:
            options["cpu_devices"] = int(top["cpu-devices"])
        except ValueError:
            raise ConfigError(f"--cpu-devices expects an integer, got {top['cpu-devices']!r}.") from None
    return config, options


def _main(argv: Sequence[str]) -> int:
    if "-h" in argv:
        argv = [a for a in argv if a != "-h"] + ["--help"]
    config, options = _parse(argv)
    if options["help"]:
        print(
            USAGE + "\n\nOptions:\n  --preset=NAME       tiny (default), gpt2-124m, llama-1b, llama-7b\n"
            "  --out=DIR           run directory (default runs/<time>-<preset>)\n"
            "  --cpu-devices=N     simulate N CPU devices (testing parallel layouts on one machine)\n"
            "  --dry-run           compile the step, print memory, FLOPs and shardings; train nothing\n\n"
            f"Config fields (defaults of --preset={options['preset']}):\n" + help_text(config)
        )
        return 0
    message = xla_flags.apply()  # before anything initialises JAX's backends
    if message:
        print(message)
    xla_flags.default_memory_fraction()
    if options["cpu_devices"] is not None:
        simulate_cpu_devices(options["cpu_devices"])
    job = distributed.initialize()  # a no-op unless the environment describes several processes
    if job.num_processes > 1 and not options["out"] and not options["dry_run"]:
        raise ConfigError(
            f"this is {job.describe()}: a multi-process run needs --out, one run directory that every "
            "process can reach (a shared file system across hosts); python -m dsjax.launch sets one."
        )
    primary = job.process_id == 0
    say = print if primary else _quiet
    compilation_cache()  # a restarted or repeated run loads its compiled programs from disk
    if options["dry_run"]:
        run = build(config, abstract=True)
        batch = jax.ShapeDtypeStruct(
            (config.train.batch_size, config.train.seq_len + 1), jnp.int32, sharding=run.batch_sharding
        )
        compiled = run.train_step.lower(run.state, batch).compile()
        say(compile_report(run, compiled, shardings=True))
        code = 0
        try:
            memory.preflight(config, compiled.memory_analysis(), jax.local_devices()[0], run.degrees)
        except ConfigError as err:
            if primary:
                print(f"dsjax: preflight: a real run would stop here: {err}", file=sys.stderr)
            code = 2
        say("dry run: compiled the train step; nothing was trained.")
        return code
    out = Path(options["out"]).expanduser() if options["out"] else rundir.default_out(options["preset"])
    try:
        run, history = train(config, out, progress=primary, log=say)
    except TrainingError:
        if out.is_dir():
            say(f"run directory: {out.resolve()}")
        raise
    if config.train.sample_tokens and history:  # an empty history: a run that had already ended, left as it was
        text = sample(run, "def ", config.train.sample_tokens, seed=config.train.seed)
        if text is not None:
            say("sample:\n" + text)
    say(f"run directory: {out.resolve()}")
    return 0


def _quiet(*_args, **_kwargs) -> None:
    """The log of processes other than 0 in a multi-process run: they train silently (errors still go
    to stderr), so a job's output is one process's story, not N copies of it."""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 2 on a bad config or flag, 1 if training, a checkpoint save or a read
    failed, 75 (checkpoint.PREEMPTED_EXIT_CODE) after a SIGTERM / SIGINT and its checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ConfigError as err:
        return _fail(f"dsjax: error: {err}", 2)
    except TrainingError as err:
        return _fail(f"dsjax: training stopped: {err}", 1)
    except ckpt.CheckpointError as err:
        distributed.await_lost_peer(err)  # a save's collective fails when a peer dies mid-save: name the peer
        return _fail(f"dsjax: checkpoint error: {err}", 1)
    except Preempted as err:
        print(f"dsjax: preempted: {err} Run the same command again to resume.", file=sys.stderr)
        return ckpt.PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        return _fail("dsjax: interrupted", 130)
    except Exception as err:
        if distributed.process_env().num_processes == 1:
            raise
        # In a job, a collective that fails (a peer died: Gloo reports a closed connection) ends here.
        distributed.await_lost_peer(err)
        first = str(err).splitlines()[0] if str(err) else ""
        return _fail(f"dsjax: process {jax.process_index()} failed: {type(err).__name__}: {first}", 1)


def _fail(message: str, code: int) -> int:
    """Print `message`; in a multi-process job also tell the other processes (they stop too, quoting it)
    and leave at once instead of waiting in JAX's shutdown barrier for peers that are stopping."""
    print(message, file=sys.stderr)
    distributed.report_failure(message)
    distributed.end_after_failure(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
