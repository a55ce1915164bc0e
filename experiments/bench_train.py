"""Train-step benchmark: one JSON line of throughput, MFU and memory for a preset on the visible devices.

Usage (from the repository root, on a GPU machine):
    PYTHONPATH=. python experiments/bench_train.py --preset=gpt2-124m --batch=32 \
        [--set=mesh.fsdp=4 ...] [--grid='precision.policy=bf16|fp16' ...] [--xla=default|none|'--flag=v ...'] \
        [--warmup=3] [--steps=20] [--windows=3] [--profile=DIR [--profile-steps=20]] [--out=FILE]

It runs what `python -m dsjax.train` runs (dsjax.train.build, prepare, the same jitted step fed by the
same prefetching batch iterator, synthetic data) with no benchmark-only code path. Compilation and
--warmup steps are excluded; then --windows windows of --steps steps are timed, each with a single
`jax.block_until_ready` at its end (BENCHMARKS.md). Reported: the median window's step time and
throughput, MFU in both FLOP counts, XLA's compiled footprint of the step and the allocator's peak
memory per device, and (where `nvidia-smi` runs) the median SM clock and power over the windows
(experiments/gpu_power.py: these GPUs train at their power limit, at clocks that differ between machines).
With --profile, --profile-steps more steps are traced with `jax.profiler` and summarised
(experiments/profile_summary.py). Trace enough of them: the trace starts after a pause, and the first
steps after a pause run at a higher clock (3 traced steps ran 2-2.6 ms faster than the windows' steps
on gpt2-124m; 20 matched them within 0.5%).

--set and --grid take config overrides (section.field=value); a --grid's values are separated by '|'
(a value may hold ',' and '='). With --grid, every combination runs in a fresh process of this script,
so XLA flags and the peak-memory counter belong to that combination alone. --xla chooses the XLA flags:
'default' (dsjax.xla_flags for the installed jaxlib), 'none', or an explicit flag string used instead.
Results are recorded in experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", help="a dsjax preset (default gpt2-124m)")
    parser.add_argument("--batch", type=int, help="global batch size (train.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1|V2", help="sweep (one process each)")
    parser.add_argument("--xla", default="default", help="'default', 'none' or an XLA_FLAGS string")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window (one block per window)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported (default 3)")
    parser.add_argument("--profile", help="trace --profile-steps more steps into this directory and summarise them")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps traced with --profile")
    parser.add_argument("--out", help="also append the JSON line(s) to this file")
    args = parser.parse_args(argv)
    for name, least in (("batch", 1), ("warmup", 0), ("steps", 1), ("windows", 1), ("profile_steps", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    for spec in args.set:
        if "=" not in spec:
            parser.error(f"--set={spec!r}: expected KEY=VALUE, e.g. --set=mesh.fsdp=2")
    return args


def sweep(args: argparse.Namespace) -> None:
    axes = []
    for spec in args.grid:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            sys.exit(f"--grid={spec!r}: expected KEY=V1|V2|...")
        axes.append([(key, v) for v in values.split("|")])
    base = [a for a in sys.argv[1:] if not a.startswith("--grid")]
    for combo in itertools.product(*axes):
        extra = [f"--xla={v}" if k == "xla" else f"--set={k}={v}" for k, v in combo]
        print(f"# {' '.join(extra)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, *base, *extra], check=False)


def apply_xla(choice: str) -> str:
    if choice == "none":
        os.environ.pop("XLA_FLAGS", None)
        return ""
    if choice == "default":
        from dsjax import xla_flags

        xla_flags.apply()
        return os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = choice
    return choice


def measure(args: argparse.Namespace) -> dict:
    flags = apply_xla(args.xla)
    from dsjax import xla_flags

    xla_flags.default_memory_fraction()  # as python -m dsjax.train does
    import jax
    import jaxlib

    from dsjax import memory
    from dsjax.config import ConfigError, apply_overrides, preset
    from dsjax.models.layers import attention_impl
    from dsjax.precision import parse_policy
    from dsjax.train import batches, build, prepare

    overrides = dict(s.split("=", 1) for s in args.set)
    if args.batch is not None:
        overrides["train.batch_size"] = str(args.batch)
    try:
        config = apply_overrides(preset(args.preset), {"data.source": "synthetic", **overrides})
    except ConfigError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        sys.exit(2)
    devices = jax.devices()
    t = config.train
    result = {
        "preset": args.preset,
        "overrides": overrides,
        "device": devices[0].device_kind,
        "n_devices": len(devices),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": flags,
        "batch": t.batch_size,
        "seq_len": t.seq_len,
        "precision": config.precision.policy,
        "remat": config.remat.policy,
        "remat_prevent_cse": config.remat.prevent_cse,
        "attention": attention_impl(
            config.model.attention, parse_policy(config.precision.policy).compute, config.model.head_dim
        ),
        "scan_layers": config.model.scan_layers,
    }
    try:
        run = build(config)
        result["mesh"] = run.degrees
        compiled = prepare(run, log=lambda text: print(text, file=sys.stderr))
        mem = compiled.memory_analysis()
        result["compiled_step_gib"] = round(memory.step_bytes(mem) / memory.GIB, 3)
    except ConfigError as e:
        result["error"] = str(e)
        return result
    n_steps = args.warmup + args.windows * args.steps + (args.profile_steps if args.profile else 0)
    feed = batches(run, run.train_samples, 0, n_steps)
    state, metrics = run.state, None
    for _ in range(args.warmup):
        state, metrics = compiled(state, next(feed))
    jax.block_until_ready((state, metrics))
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_power import Sampler

    sampler = Sampler()
    sampler.mark("windows")
    times = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, next(feed))
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / args.steps)
    sampler.mark("end")
    power = sampler.summary().get("windows", {})
    step_time = statistics.median(times)
    tokens_per_sec = run.tokens_per_step / step_time
    peaks = [s.get("peak_bytes_in_use") for s in (d.memory_stats() or {} for d in run.mesh.devices.flat)]
    result.update(
        step_time_ms=round(1000 * step_time, 2),
        window_step_times_ms=[round(1000 * x, 2) for x in times],
        tokens_per_sec=round(tokens_per_sec),
        tokens_per_sec_per_device=round(tokens_per_sec / run.mesh.devices.size),
        mfu=None if run.peak_flops is None else round(tokens_per_sec * run.flops_per_token[0] / run.peak_flops, 4),
        mfu_causal=None
        if run.peak_flops is None
        else round(tokens_per_sec * run.flops_per_token[1] / run.peak_flops, 4),
        peak_memory_gib=None if None in peaks else round(max(peaks) / memory.GIB, 3),
        loss=float(metrics["loss"]),
        skipped_steps=int(metrics["skipped_steps"]),
        timed_steps=args.windows * args.steps,
        sm_clock_mhz_median=power.get("sm_mhz_median"),
        power_w_median=power.get("power_w_median"),
    )
    if args.profile:
        from profile_summary import summarise

        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.profile_steps):
                state, metrics = compiled(state, next(feed))
            jax.block_until_ready((state, metrics))
            result["profile_wall_ms_per_step"] = round(1000 * (time.perf_counter() - start) / args.profile_steps, 2)
        result["profile"] = summarise(args.profile, steps=args.profile_steps)
    return result


def main() -> None:
    args = parse_args()
    if args.grid:
        sweep(args)
        return
    result = measure(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
