"""Checkpoint benchmark: what saving and restoring cost a training run. Prints one JSON line.

Usage (from the repository root; the issue's target workload is llama-1b on one H100):
    PYTHONPATH=. python experiments/bench_checkpoint.py --preset=llama-1b [--batch=8] [--steps=300]
        [--every=100] [--dir=/tmp/dsjax-bench-ckpt] [--sync] [--set=section.field=value ...]

Measured, in one process on the same compiled step (dsjax.train.build / prepare, synthetic data):
- step_time_ms: mean step time without checkpoints, over --steps steps (one block at the end);
- with_saves_step_time_ms and overhead: the same number of steps, saving every --every steps exactly as
  the training loop does (dsjax.checkpoint.Checkpointer.save); the writes still in the background when
  the last step finished are reported apart, as final_flush_s;
- save_blocking_s: how long each save() held up the training loop once its step had finished (the copy
  on the devices with checkpoint.device_copy, the copy off the devices for async saves without it, the
  whole write with --sync), median over the saves; handoff_each_s: with the device copy, how long its
  background thread took to get each copy to Orbax (off the devices), while training went on;
- with --first-save-apart, first_save_apart: the process's first save taken (and waited for) before the
  timed window, whose saves are then all later ones: blocking_s, handoff_s, total_s;
- reserved_gb, reserved_s: the pinned host memory Checkpointer.reserve_host_memory made ready, while the
  step compiled (compile_s), for the first save's copy off the devices (on GPUs; --no-reserve leaves it
  out), and how long that took;
- peak_memory_gib: the most memory any local device held during the run (the device copy adds one state);
- save_total_s: from the last save() call (at the last step when --every divides --steps) until the
  checkpoint was finalized and its manifest written;
- verify_s: checking the newest checkpoint against its manifest (the SHA-256 of every file), alone;
- restore_s and restore_gb_per_s: reading the newest checkpoint back onto the run's mesh (manifest check
  included), and the checkpoint's bytes over that time. The files were just written, so this is a warm
  read from the page cache, faster than a cold restart.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax
import jaxlib

from dsjax import checkpoint as ckpt
from dsjax import memory
from dsjax.config import apply_overrides, preset
from dsjax.train import batches, build, checkpoint_meta, prepare, restore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/dsjax-bench-ckpt")
    parser.add_argument("--sync", action="store_true", help="blocking saves instead of async ones")
    parser.add_argument("--no-warm-up", action="store_true", help="skip Checkpointer.warm_up (the before case)")
    parser.add_argument(
        "--no-reserve", action="store_true", help="no pinned host memory reserved for the first save beforehand"
    )
    parser.add_argument(
        "--first-save-apart",
        action="store_true",
        help="take the process's first save (and wait for it) before the timed window: the window then shows "
        "the steady state, and first_save_* the one-time cost",
    )
    parser.add_argument("--profile-first-save", action="store_true", help="cProfile of the first save, to stderr")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from dsjax import xla_flags

    xla_flags.apply()
    xla_flags.default_memory_fraction()  # as python -m dsjax.train does
    overrides = dict(s.split("=", 1) for s in args.set)
    if args.batch:
        overrides["train.batch_size"] = str(args.batch)
    overrides.update({"data.source": "synthetic", "checkpoint.async_save": str(not args.sync).lower()})
    config = apply_overrides(preset(args.preset), overrides)
    run = build(config)
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    saver = ckpt.Checkpointer(directory, config.checkpoint, log=lambda text: print(text, file=sys.stderr))
    if not args.no_reserve:
        saver.reserve_host_memory(run.state)  # as python -m dsjax.train does, beside the compilation
    t0 = time.perf_counter()
    compiled = prepare(run, log=lambda text: print(text, file=sys.stderr))
    compile_s = time.perf_counter() - t0
    saver.wait_for_reservation()  # as python -m dsjax.train does
    total = args.warmup + 2 * args.steps
    feed = batches(run, run.train_samples, 0, total)
    for _ in range(args.warmup):
        run.state, metrics = compiled(run.state, next(feed))
    jax.block_until_ready(run.state)

    start = time.perf_counter()
    for _ in range(args.steps):
        run.state, metrics = compiled(run.state, next(feed))
    jax.block_until_ready((run.state, metrics))
    plain = (time.perf_counter() - start) / args.steps

    if not args.no_warm_up:
        saver.warm_up(run.state)  # as dsjax.train.fit does before its first step
    first_save = None
    if args.first_save_apart:
        t0 = time.perf_counter()
        saver.save(run.state, checkpoint_meta(run))
        blocked = time.perf_counter() - t0
        saver.wait()
        first_save = {"blocking_s": round(blocked, 3), "total_s": round(time.perf_counter() - t0, 3)}
        first_save["handoff_s"] = round(saver.handoff_s.pop(), 3) if saver.handoff_s else None
    blocking, totals = [], []
    start = time.perf_counter()
    for i in range(args.steps):
        run.state, metrics = compiled(run.state, next(feed))
        if (i + 1) % args.every == 0:
            jax.block_until_ready(run.state)  # save() waits for the step anyway; time the save alone
            t0 = time.perf_counter()
            if args.profile_first_save and not blocking:
                profile = cProfile.Profile()
                profile.runcall(saver.save, run.state, checkpoint_meta(run))
                pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
            else:
                saver.save(run.state, checkpoint_meta(run))
            blocking.append(time.perf_counter() - t0)
            totals.append(t0)
    jax.block_until_ready((run.state, metrics))
    with_saves = (time.perf_counter() - start) / args.steps
    t0 = time.perf_counter()
    saver.wait()
    final_flush = time.perf_counter() - t0
    # total save time of the last save: until wait() returned (finalized, manifest written)
    save_total = time.perf_counter() - totals[-1] if totals else None
    peak_gib = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / memory.GIB
    peak_gib = round(peak_gib, 3) or None
    saved_bytes = sum(p.stat().st_size for p in (directory / str(saver.last_saved)).rglob("*") if p.is_file())
    saver.manager.close()

    t0 = time.perf_counter()
    problem = ckpt.verify(directory / str(saver.last_saved))
    verify_s = time.perf_counter() - t0
    assert problem is None, problem
    reader = ckpt.Checkpointer(directory, config.checkpoint, log=lambda text: print(text, file=sys.stderr))
    jax.block_until_ready(run.state)
    t0 = time.perf_counter()
    restore(run, reader, log=lambda text: print(text, file=sys.stderr))
    jax.block_until_ready(run.state)
    restore_s = time.perf_counter() - t0
    reader.manager.close()

    print(
        json.dumps(
            {
                "preset": args.preset,
                "overrides": overrides,
                "device": jax.devices()[0].device_kind,
                "n_devices": len(jax.devices()),
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "mesh": run.degrees,
                "batch": config.train.batch_size,
                "async_save": not args.sync,
                "device_copy": config.checkpoint.device_copy,
                "warm_up": not args.no_warm_up,
                "compile_s": round(compile_s, 2),
                # pinned beside the compilation for the first save's copy off the devices, and how long it took
                "reserved_gb": saver.reserved and round(saver.reserved[0] / 1e9, 2),
                "reserved_s": saver.reserved and round(saver.reserved[1], 3),
                "steps": args.steps,
                "every": args.every,
                "step_time_ms": round(1000 * plain, 2),
                "with_saves_step_time_ms": round(1000 * with_saves, 2),
                "overhead": round(with_saves / plain - 1, 4),
                "final_flush_s": round(final_flush, 3),
                "first_save_apart": first_save,
                "saves": len(blocking),
                "save_blocking_s": round(statistics.median(blocking), 3) if blocking else None,
                "save_blocking_each_s": [round(b, 3) for b in blocking],
                "save_total_s": None if save_total is None else round(save_total, 3),
                # with the device copy: how long each background handoff took to get the arrays to Orbax
                "handoff_each_s": [round(h, 3) for h in saver.handoff_s],
                "peak_memory_gib": peak_gib,
                "checkpoint_gib": round(saved_bytes / memory.GIB, 3),
                "verify_s": round(verify_s, 3),
                "restore_s": round(restore_s, 3),
                "restore_gb_per_s": round(saved_bytes / 1e9 / restore_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
