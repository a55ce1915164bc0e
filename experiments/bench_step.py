"""Train-step benchmark: tokens/s, MFU and memory for a preset under precision and remat choices.

Usage (on a GPU machine, from the repository root):
    PYTHONPATH=. python experiments/bench_step.py --preset=gpt2-124m --batch=32 \
        --grid='precision.policy=bf16|fp16' --grid=remat.policy=none [--set=train.seq_len=1024] [--out=FILE]

Grid values are separated by '|' (a value may hold ',' and '=', as in 'p=f32,c=bf16,o=bf16').
Every combination of the --grid values is built (synthetic data), compiled, run for 5 warm-up steps and
then timed over --windows windows of --window steps each, with `jax.block_until_ready` only at the end
of a window (BENCHMARKS.md). The reported step time is the median over windows. Memory is the compiled
step's footprint (XLA memory analysis; the allocator's own peak is process-wide, so it cannot tell the
combinations of one sweep apart). One JSON object
per combination goes to stdout (and to --out). A combination that does not fit is reported with its
preflight numbers instead of crashing the sweep. Results are recorded in experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time

import jax
import jaxlib
import numpy as np

from dsjax import memory
from dsjax.config import ConfigError, apply_overrides, preset
from dsjax.train import build


def measure(overrides: dict[str, str], name: str, warmup: int, windows: int, window: int) -> dict:
    config = apply_overrides(preset(name), {"data.source": "synthetic", **overrides})
    result = {
        "preset": name,
        **overrides,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "seq_len": config.train.seq_len,
        "precision": config.precision.policy,
        "remat": config.remat.policy,
    }
    try:
        run = build(config)
        result["mesh"] = run.degrees
        t = config.train
        rows = np.random.default_rng(0).integers(0, config.model.vocab_size, (t.batch_size, t.seq_len + 1))
        batch = jax.device_put(rows.astype(np.int32), run.batch_sharding)
        compiled = run.train_step.lower(run.state, batch).compile()
        mem = compiled.memory_analysis()
        result["compiled_step_gib"] = round(memory.step_bytes(mem) / memory.GIB, 3)
        result["temp_gib"] = round(mem.temp_size_in_bytes / memory.GIB, 3)
        memory.preflight(config, mem, run.mesh.devices.flat[0], run.degrees)
        state = run.state
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(window):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append((time.perf_counter() - start) / window)
        step_time = statistics.median(times)
        tokens_per_sec = run.tokens_per_step / step_time
        result.update(
            step_time_ms=round(1000 * step_time, 2),
            tokens_per_sec=round(tokens_per_sec),
            mfu=None if run.peak_flops is None else round(tokens_per_sec * run.flops_per_token[0] / run.peak_flops, 4),
            mfu_causal=None
            if run.peak_flops is None
            else round(tokens_per_sec * run.flops_per_token[1] / run.peak_flops, 4),
            loss=float(metrics["loss"]),
            skipped_steps=int(metrics["skipped_steps"]),
            timed_steps=windows * window,
        )
        del state, run, compiled
    except ConfigError as err:
        result["error"] = str(err)
    gc.collect()
    jax.clear_caches()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--grid", action="append", default=[], help="section.field=v1|v2|...")
    parser.add_argument("--set", action="append", default=[], help="section.field=value for every combination")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    fixed = {"train.batch_size": str(args.batch), **dict(s.split("=", 1) for s in args.set)}
    keys = [g.split("=", 1)[0] for g in args.grid]
    values = [g.split("=", 1)[1].split("|") for g in args.grid]
    for combo in itertools.product(*values):
        result = measure(
            {**fixed, **dict(zip(keys, combo, strict=True))}, args.preset, args.warmup, args.windows, args.window
        )
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
