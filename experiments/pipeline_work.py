"""The work of a pipeline loop, all its stages on one device, against the plain step: one JSON line each.

Usage (from the repository root):
    PYTHONPATH=. python experiments/pipeline_work.py --preset=llama-1b --batch=8 --plans=2x8,4x16 [--steps=10]
        [--schedules=1f1b,gpipe,circular] [--repeats=2]

For each schedule and plan PxM (P stages, M microbatches) it times the loss and gradients (no optimizer)
on a mesh of one device: 1F1B's `dsjax.pipeline_1f1b.value_and_grad_1f1b`, or autodiff of the model with its
layers run by `dsjax.pipeline.run` (GPipe, and circular with --repeats chunks per stage), where the vmap
over the stages runs every stage's work of every tick on that device, bubble ticks included; then the
same loss and gradients by autodiff of the unpipelined model (`dsjax.step.loss_fn`), and the relative
difference of the two gradients. This is not pipeline efficiency, which needs P devices
(`bench_pipeline.py`): it shows how much work a tick costs, summed over the stages, and so what a change to
the loop saves. With all stages' work on one device, the
ideal ratio of the two times is 1 / (1 - bubble): (M + P - 1) / M for 1F1B (the loop's M + 2P - 1 ticks,
of which the first P run only forward passes and the last P only backward passes, cost M + P - 1 full
ticks; before those phases were split off, all M + 2P - 1 were full ticks) and GPipe, (R M + P - 1) / (R M)
for circular; what exceeds it is the loop's own overhead (recompute, the LM head and loss per tick, copies).

GPipe and circular run their ticks unrolled (the default, `pipeline.unroll`) or with --scanned as scans.
Compilation and --warmup calls are excluded; --steps calls are timed with one block at the end. It also
reports XLA's compiled temporaries. The call signature of value_and_grad_1f1b is the same at every
commit since 1F1B existed, so older code can be timed by putting it first on PYTHONPATH (`pipeline.run`
gained its `cast` and `per_layer` arguments later, `Decoder.stage_fn` its `vmapped`; they are passed where
taken).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--plans", default="2x8", help="comma-separated PxM: stages x microbatches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--schedules", default="1f1b", help="comma-separated: 1f1b, gpipe, circular")
    parser.add_argument("--repeats", type=int, default=2, help="chunks per stage for the circular schedule")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--label", default="", help="a tag copied into every line (e.g. the commit)")
    parser.add_argument("--scanned", action="store_true", help="GPipe and circular ticks as scans (pipeline.unroll)")
    args = parser.parse_args()

    from dsjax import xla_flags

    xla_flags.apply()
    xla_flags.default_memory_fraction()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsjax import pipeline
    from dsjax.config import apply_overrides, preset
    from dsjax.pipeline import Plan
    from dsjax.pipeline_1f1b import value_and_grad_1f1b
    from dsjax.step import loss_fn
    from dsjax.train import batch_at, build

    overrides = {"data.source": "synthetic", "train.batch_size": str(args.batch), "mesh.fsdp": "1"}
    overrides.update(dict(s.split("=", 1) for s in args.set))
    config = apply_overrides(preset(args.preset), overrides)
    run = build(config, devices=jax.devices()[:1])
    params, batch = run.state.params, batch_at(run, run.train_samples, 0)
    one = jnp.ones((), jnp.float32)

    def timed(fn) -> tuple[dict, tuple]:
        compiled = jax.jit(fn).lower(params, batch).compile()
        out = None
        for _ in range(args.warmup):
            out = compiled(params, batch)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(args.steps):
            out = compiled(params, batch)
        jax.block_until_ready(out)
        return {
            "ms": round(1000 * (time.perf_counter() - start) / args.steps, 2),
            "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
            "loss": float(out[0]),
        }, out

    def relative_difference(grads, reference) -> float:  # over all parameters: |g - ref| / |ref|
        def sq(tree):
            return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree))

        return float(jnp.sqrt(sq(jax.tree.map(jnp.subtract, grads, reference)) / sq(reference)))

    base = {"label": args.label, "preset": args.preset, "batch": args.batch, "device": jax.devices()[0].device_kind}
    plain, (_, reference) = timed(jax.value_and_grad(lambda p, b: loss_fn(run.graphdef, p, b, run.mesh)))
    print(json.dumps({**base, "loop": "autodiff, unpipelined", **plain}), flush=True)

    def pipelined_loss(params, batch, plan):  # the model's loss with its layers run by pipeline.run
        model = nnx.merge(run.graphdef, params)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        x = model.embed_tokens(tokens, run.mesh)
        options, stage_options = {}, {}
        if "cast" in inspect.signature(pipeline.run).parameters:
            options = {"cast": model.compute_weights, "per_layer": not model.cfg.scan_layers}
        if "vmapped" in inspect.signature(model.stage_fn).parameters:
            stage_options = {"vmapped": True}
        stage = model.stage_fn(tokens.shape[1], run.mesh, **stage_options)
        x = pipeline.run(stage, x, model.blocks.arrays(), model.block_logical(), plan, run.mesh, **options)
        return model.token_losses(model.final_norm_fn(x, run.mesh), model.head(), labels, run.mesh).mean()

    for schedule in args.schedules.split(","):
        for spec in args.plans.split(","):
            P, M = (int(v) for v in spec.split("x"))
            R = args.repeats if schedule == "circular" else 1
            loop_kind = {"unroll": not args.scanned} if "unroll" in Plan.__dataclass_fields__ else {}
            plan = Plan(stages=P, microbatches=M, repeats=R, schedule=schedule, **loop_kind)
            if schedule == "1f1b":
                fn = lambda p, b, plan=plan: value_and_grad_1f1b(run.graphdef, p, b, run.mesh, plan, one)  # noqa: E731
            else:
                fn = jax.value_and_grad(lambda p, b, plan=plan: pipelined_loss(p, b, plan))
            result, (_, grads) = timed(fn)
            result["grad_relative_difference"] = relative_difference(grads, reference)
            del grads
            ideal = plain["ms"] / (1 - plan.bubble)
            loop = f"{schedule} P={P} M={M}" + (f" R={R}" if R > 1 else "")
            if loop_kind and schedule != "1f1b":
                loop += " unrolled" if plan.unroll else " scanned"
            print(json.dumps({**base, "loop": loop, **result, "ideal_ms": round(ideal, 2)}), flush=True)


if __name__ == "__main__":
    main()
