"""Time the train step's tail alone: from the gradients to the updated state and the metrics.

Usage (from the repository root, on a GPU machine):
    PYTHONPATH=. python experiments/bench_update.py [--preset=gpt2-124m] [--set=KEY=VALUE ...] \
        [--calls=20] [--reps=5] [--variants=dsjax,...] [--out=FILE] [--dump=DIR] [--profile=DIR]

The tail is `dsjax.step.apply_gradients` (unscale, global norm, the optimizer's update applied only if
every gradient is finite, the loss scale, the metrics). It is jitted with the state donated, as in the
train step, and fed the preset's freshly initialised state (its parameters and optimizer state, on the
device) and random fp32 gradients of the parameters' shapes. Each variant below changes one thing against
the committed formulation; the lower bounds drop work the step must do, to show what it costs. One JSON line
per variant: microseconds per call (median of --reps runs of --calls chained calls, one block per run) and
the copy instructions of parameter-shaped arrays in XLA's optimized HLO (XLA may run several as one copy
kernel, so a profile can show fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import run as run_lib
from dsjax import step as step_lib
from dsjax.optim import make_optimizer
from dsjax.optim import schedule as make_schedule
from dsjax.precision import GradientScaler, loss_scale_from_config
from dsjax.state import TrainState

_norm = step_lib._norm


def tail(state, loss, grads, tx, scaler, schedule, *, update_norm="diff", param_norm=True, select=True):
    """The committed tail (the defaults; without the loss-scale metrics, which are scalars), or with one
    part changed. update_norm: 'diff' (new minus old parameters), 'updates' (the optimizer's update),
    'variadic' (both norms' sums of squares in one reduction), 'squares' ((new - old)^2 written out,
    then summed) or 'none'. param_norm: True, 'barrier' (an optimization barrier between the update and
    the norm of the new parameters) or False. select=False applies the update whether or not the
    gradients are finite."""
    grads = scaler.unscale(grads, state.loss_scale)
    grad_norm = _norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
    if select:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if param_norm == "barrier":  # the norm reads the written parameters instead of joining the update's fusion
        params = jax.lax.optimization_barrier(params)
    if update_norm == "variadic":  # both norms' sums of squares in one reduction per parameter
        pairs = jax.tree.map(variadic_squares, params, state.params)
        sums = jax.tree.leaves(pairs, is_leaf=lambda x: isinstance(x, tuple))
        metrics["param_norm"] = jnp.sqrt(sum(a for a, _ in sums))
        metrics["update_norm"] = jnp.sqrt(sum(b for _, b in sums))
    elif param_norm:
        metrics["param_norm"] = _norm(params)
    if update_norm == "diff":
        metrics["update_norm"] = _norm(jax.tree.map(lambda n, o: n.astype(jnp.float32) - o, params, state.params))
    elif update_norm == "updates":
        metrics["update_norm"] = jnp.where(finite, _norm(updates), 0.0)
    elif update_norm == "squares":  # the update's fusion also writes (new - old)^2, which a reduction then reads
        squares = jax.tree.map(lambda n, o: jnp.square(n.astype(jnp.float32) - o), params, state.params)
        squares = jax.lax.optimization_barrier(squares)
        metrics["update_norm"] = jnp.sqrt(sum(jnp.sum(x) for x in jax.tree.leaves(squares)))
    loss_scale = scaler.update(state.loss_scale, finite)
    metrics["lr"] = schedule(state.step - state.loss_scale.skipped_steps)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale), metrics


def variadic_squares(new, old):
    """(sum new^2, sum (new - old)^2) of one parameter, as one variadic reduction over both."""
    new32 = new.astype(jnp.float32)
    diff = new32 - old
    return jax.lax.reduce(
        (new32 * new32, diff * diff),
        (jnp.float32(0), jnp.float32(0)),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        tuple(range(new.ndim)),
    )


VARIANTS = {
    "dsjax": None,  # dsjax.step.apply_gradients as it is now
    "diff": {},
    "updates": {"update_norm": "updates"},
    "variadic": {"update_norm": "variadic"},
    "squares": {"update_norm": "squares"},
    "squares_barrier": {"update_norm": "squares", "param_norm": "barrier"},
    "updates_barrier": {"update_norm": "updates", "param_norm": "barrier"},
    "no_update_norm": {"update_norm": "none"},
    "no_update_norm_barrier": {"update_norm": "none", "param_norm": "barrier"},
    "no_norms": {"update_norm": "none", "param_norm": False},
    "no_norms_no_select": {"update_norm": "none", "param_norm": False, "select": False},
}


def hlo_dtype(dtype) -> str:
    """HLO's spelling of a dtype: float32 -> f32, bfloat16 -> bf16."""
    return {"bfloat16": "bf16"}.get(dtype.name, dtype.name.replace("float", "f"))


def param_copies(hlo: str, shapes: set[str]) -> int:
    """Copy instructions in an optimized HLO module whose result has one of the parameters' shapes."""
    return sum(1 for m in re.finditer(r"= (\w+\[[\d,]*\])\S* copy(?:-start)?\(", hlo) if m.group(1) in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out")
    parser.add_argument("--dump", help="write each variant's optimized HLO to DIR/VARIANT.txt")
    parser.add_argument("--profile", help="trace --calls more calls of each variant into DIR/VARIANT and summarise")
    args = parser.parse_args()

    config = config_lib.apply_overrides(config_lib.preset(args.preset), dict(s.split("=", 1) for s in args.set))
    run = run_lib.build(config)
    tx = make_optimizer(config.train)
    scaler = GradientScaler(loss_scale_from_config(config.precision))
    schedule = make_schedule(config.train)
    keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(run.state.params)))
    leaves, treedef = jax.tree.flatten(run.state.params)
    grads = jax.tree.unflatten(
        treedef, [1e-3 * jax.random.normal(k, p.shape, jnp.float32) for k, p in zip(keys, leaves, strict=True)]
    )
    grads = jax.device_put(grads, run.shardings.params)
    loss = jnp.float32(3.0)
    shapes = {f"{hlo_dtype(p.dtype)}[{','.join(map(str, p.shape))}]" for p in leaves}
    n_params = sum(p.size for p in leaves)

    for name in args.variants.split(","):
        options = VARIANTS[name]
        if options is None:
            fn = lambda s, lo, g: step_lib.apply_gradients(s, lo, g, tx, scaler, schedule)  # noqa: E731
        else:
            fn = lambda s, lo, g, o=options: tail(s, lo, g, tx, scaler, schedule, **o)  # noqa: E731
        jitted = jax.jit(fn, donate_argnums=0, out_shardings=(run.shardings, None))
        compiled = jitted.lower(run.state, loss, grads).compile()
        hlo = compiled.as_text()
        copies = param_copies(hlo, shapes)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.txt"), "w") as f:
                f.write(hlo)
        state, _ = compiled(run.state, loss, grads)
        jax.block_until_ready(state)
        runs = []
        for _ in range(args.reps):
            start = time.perf_counter()
            for _ in range(args.calls):
                state, metrics = compiled(state, loss, grads)
            jax.block_until_ready((state, metrics))
            runs.append((time.perf_counter() - start) / args.calls)
        if args.profile:
            from profile_summary import summarise

            trace_dir = os.path.join(args.profile, name)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(args.calls):
                    state, metrics = compiled(state, loss, grads)
                jax.block_until_ready((state, metrics))
            summary = summarise(trace_dir, steps=args.calls, top=12)
        run.state = state
        row = {
            "variant": name,
            "preset": args.preset,
            "overrides": args.set,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "params": n_params,
            "us_per_call": round(1e6 * statistics.median(runs), 1),
            "us_runs": [round(1e6 * r, 1) for r in runs],
            "param_copies": copies,
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        if args.profile:
            row["profile"] = {k: summary[k] for k in ("kernel_ms_per_step", "idle_ms_per_step", "top_kernels")}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
