"""Why timed windows run slower than profiled steps: one compiled train step timed five ways in one process.

Usage: python experiments/step_gap.py [--preset=gpt2-124m] [--batch=32] [--steps=20] [--set=k=v ...]
        [--profile=DIR] [--out=FILE]

The phases, in this order, after 3 warm-up steps:
  feed     windows of --steps steps fed by the training loop's prefetching iterator (as bench_train.py);
  fixed    the same with one batch already on the device, passed to every step (no host data work);
  sync     one step at a time, blocking after each (a step's device time plus one dispatch);
  traced   --steps steps under `jax.profiler.trace`: their wall time, and the trace's span, busy and idle
           time per step (profile_summary.py);
  feed     the first phase again.
With `nvidia-smi` on the PATH, the SM clock and power are sampled every 50 ms and summarised per phase.
One JSON line is printed (and appended to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per window and traced steps")
    parser.add_argument("--windows", type=int, default=3, help="windows per timed phase")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--profile", help="trace directory (a temporary one by default)")
    parser.add_argument("--top", type=int, default=8, help="kernels and idle gaps listed from the trace")
    parser.add_argument("--out", help="append the JSON line to this file")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    from dsjax import xla_flags

    xla_flags.apply()  # as python -m dsjax.train does
    xla_flags.default_memory_fraction()
    import jax

    from dsjax.config import apply_overrides, preset
    from dsjax.train import batches, build, prepare

    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_power import Sampler
    from profile_summary import summarise

    overrides = {"data.source": "synthetic", "train.batch_size": str(args.batch)}
    overrides.update(s.split("=", 1) for s in args.set)
    run = build(apply_overrides(preset(args.preset), overrides))
    compiled = prepare(run, log=lambda text: print(text, file=sys.stderr))
    n = args.steps
    feed = batches(run, run.train_samples, 0, 3 + 4 * args.windows * n + n)
    state, metrics = run.state, None
    for _ in range(3):
        state, metrics = compiled(state, next(feed))
    jax.block_until_ready((state, metrics))
    fixed = next(feed)
    sampler = Sampler()
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "overrides": overrides,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }

    def windows(batch_of):
        nonlocal state, metrics
        times = []
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(n):
                state, metrics = compiled(state, batch_of())
            jax.block_until_ready((state, metrics))
            times.append(round(1000 * (time.perf_counter() - start) / n, 2))
        return times

    sampler.mark("feed")
    result["feed_ms"] = windows(lambda: next(feed))
    sampler.mark("fixed")
    result["fixed_ms"] = windows(lambda: fixed)
    sampler.mark("sync")
    sync, dispatch = [], []
    for _ in range(n):
        start = time.perf_counter()
        state, metrics = compiled(state, fixed)
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready((state, metrics))
        sync.append(time.perf_counter() - start)
    result["sync_ms_median"] = round(1000 * statistics.median(sync), 2)
    result["dispatch_ms_median"] = round(1000 * statistics.median(dispatch), 3)
    sampler.mark("traced")
    trace_dir = args.profile or tempfile.mkdtemp(prefix="step_gap_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, next(feed))
        jax.block_until_ready((state, metrics))
        result["traced_wall_ms"] = round(1000 * (time.perf_counter() - start) / n, 2)
    sampler.mark("feed again")
    result["feed_again_ms"] = windows(lambda: next(feed))
    sampler.mark("end")
    try:
        summary = summarise(trace_dir, steps=n, top=args.top)
        keys = (
            "span_ms_per_step",
            "busy_ms_per_step",
            "idle_ms_per_step",
            "kernel_ms_per_step",
            "categories_ms_per_step",
            "top_kernels",
            "gaps_over_10us_per_step",
            "largest_gaps",
        )
        result["traced"] = {k: summary[k] for k in keys}
    except SystemExit as e:  # no GPU streams in the trace (a CPU run)
        result["traced"] = str(e)
    result["clocks"] = sampler.summary()
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
