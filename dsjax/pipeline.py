"""Pipeline parallelism over the mesh's `pipeline` axis: GPipe and circular (interleaved) schedules.

The decoder's stacked layers (L, ...) are cut into P * R chunks of c = L / (P * R) consecutive layers;
chunk k runs on stage k mod P, so stage s holds chunks s, s + P, ..., s + (R - 1) P (GPipe: R = 1, one
chunk of L / P layers per stage). The global batch is split into M microbatches with the same strided
split as gradient accumulation (`dsjax.step.microbatches`).

The schedule is one SPMD loop of R * M + P - 1 ticks, written for GSPMD (no hand-written collectives):
a buffer of P stage inputs, sharded over the pipeline axis, goes through `vmap(stage)` (each device runs
its own stage on its own slot), then rolls by one slot, which XLA lowers to a collective permute between
neighbouring stages. At tick t stage s works on item t - s: microbatch (t - s) mod M in repeat
(t - s) // M. Stage 0 takes a fresh microbatch in repeat 0 and, with R > 1, the last stage's output of
the previous repeat otherwise (kept in a per-microbatch store, which needs M >= P). Autodiff of the loop
gives the backward pass in reverse tick order: all forward work, then all backward work (GPipe), with
the activations of every tick kept (or rematerialised as the remat policy says). Idle slots (the
bubble, a fraction (P - 1) / (R M + P - 1) of the ticks) compute on zeros or stale activations whose
outputs are never used, so they contribute nothing to the loss or the gradients.

The stored parameters keep the canonical layer order (a checkpoint does not depend on the pipeline
layout) with the layer axis split over the pipeline axis in contiguous blocks. For GPipe that block is
exactly the stage's chunk; for the circular schedule the chunks of a stage are not contiguous, so every
step regroups the block weights across stages (an all-to-all of the layer weights, and of their
gradients in the backward pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsjax import sharding
from dsjax.config import Config, ConfigError
from dsjax.sharding import constrain

STAGE_ACT = ("stage", "act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a step is pipelined: P stages, M microbatches, R chunks per stage."""

    stages: int
    microbatches: int
    repeats: int
    schedule: str

    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of stage-ticks that do no useful work: (P - 1) / (R M + P - 1)."""
        return (self.stages - 1) / self.ticks

    def chunks(self, n_layers: int) -> list[list[range]]:
        """For each stage, the layer ranges it runs, in the order it runs them."""
        c = n_layers // (self.stages * self.repeats)
        return [
            [range((r * self.stages + s) * c, (r * self.stages + s + 1) * c) for r in range(self.repeats)]
            for s in range(self.stages)
        ]

    def describe(self, n_layers: int) -> str:
        def span(layers: range) -> str:
            return str(layers.start) if len(layers) == 1 else f"{layers.start}-{layers.stop - 1}"

        stages = "; ".join(
            f"stage {s}: layers " + ", ".join(span(r) for r in chunks) for s, chunks in enumerate(self.chunks(n_layers))
        )
        return (
            f"pipeline: {self.schedule}, {self.stages} stages x {self.repeats} chunk(s), {self.microbatches} "
            f"microbatches, {self.ticks} ticks, bubble {100 * self.bubble:.1f}% ({stages})"
        )


def make_plan(config: Config, degrees: dict[str, int]) -> Plan | None:
    """The run's pipeline plan (None without pipeline parallelism), after checking that the layers, the
    batch and the remat groups split as the schedule needs; every violation is a ConfigError that names
    the fields and the numbers."""
    P = degrees["pipeline"]
    if P == 1:
        return None
    p, m, t = config.pipeline, config.model, config.train
    R = p.repeats
    M = p.microbatches or P
    shards = degrees["data"] * degrees["fsdp"]
    if m.n_layers % (P * R):
        raise ConfigError(
            f"model.n_layers ({m.n_layers}) must be divisible by mesh.pipeline x pipeline.repeats = {P} x {R} "
            f"= {P * R}: every stage runs {R} chunk(s) of the same number of layers."
        )
    per_chunk = m.n_layers // (P * R)
    if config.remat.policy != "none" and per_chunk % config.remat.every:
        raise ConfigError(
            f"remat.every ({config.remat.every}) must divide the {per_chunk} layers of a pipeline chunk "
            f"(model.n_layers {m.n_layers} / (mesh.pipeline {P} x pipeline.repeats {R})): remat groups may "
            "not straddle stages."
        )
    micro = t.batch_size // t.grad_accum
    if micro % (M * shards):
        raise ConfigError(
            f"train.batch_size / train.grad_accum ({t.batch_size} / {t.grad_accum} = {micro}) must be divisible "
            f"by pipeline.microbatches x mesh.data x mesh.fsdp = {M} x {degrees['data']} x {degrees['fsdp']} "
            f"= {M * shards}: each microbatch is split evenly over the batch shards."
        )
    if R > 1 and M < P:
        raise ConfigError(
            f"the circular schedule needs pipeline.microbatches >= mesh.pipeline ({M} < {P}): a microbatch "
            "comes back to stage 0 for its next chunk only after all stages have passed it on."
        )
    return Plan(stages=P, microbatches=M, repeats=R, schedule=p.schedule)


def run(
    stage: Callable[[dict, jax.Array], jax.Array],
    x: jax.Array,
    stacked: dict[str, jax.Array],
    logical: dict[str, tuple],
    plan: Plan,
    mesh: jax.sharding.Mesh,
) -> jax.Array:
    """All layers of `stacked` ({name: (L, ...)}, with the logical axis names in `logical`) applied to
    x (B, T, D) by the pipeline schedule; `stage(chunk, x)` runs one chunk ({name: (c, ...)}) on one
    microbatch (mb, T, D)."""
    with sharding.rules(act_batch=("data", "fsdp")):  # each stage holds whole microbatches
        return _run(stage, x, stacked, logical, plan, mesh)


def _run(stage, x, stacked, logical, plan, mesh):
    from dsjax.step import merge_microbatches, microbatches

    P, M, R = plan.stages, plan.microbatches, plan.repeats
    n_layers = next(iter(stacked.values())).shape[0]
    c = n_layers // (P * R)

    def regroup(name, a):  # (L, ...) -> (P, R, c, ...): stage s, repeat r holds chunk r * P + s
        grouped = a.reshape(R, P, c, *a.shape[1:]).swapaxes(0, 1)
        return constrain(grouped, ("stage", None, None, *logical[name][1:]), mesh)

    weights = {name: regroup(name, a) for name, a in stacked.items()}
    xs = microbatches(x, M, mesh, ("act_batch", "act_seq", "act_embed"))  # (M, mb, T, D)
    slot = jnp.arange(P)
    run_stages = jax.vmap(stage, spmd_axis_name="pipeline")

    def tick(carry, t):
        inputs, store = carry  # (P, mb, T, D) stage inputs, (M, mb, T, D) last-stage outputs
        first = jnp.where(t < M, xs[t % M], store[t % M])  # stage 0: repeat 0 takes a fresh microbatch
        inputs = constrain(jnp.where((slot == 0)[:, None, None, None], first[None], inputs), STAGE_ACT, mesh)
        repeat = jnp.clip((t - slot) // M, 0, R - 1)  # the chunk each stage runs at this tick
        chunk = jax.vmap(lambda w, r: jax.tree.map(lambda a: a[r], w))(weights, repeat)
        outputs = constrain(run_stages(chunk, inputs), STAGE_ACT, mesh)
        item = t - (P - 1)  # the last stage's work item: microbatch item % M of repeat item // M
        done = (item >= 0) & (item < R * M)
        index = jnp.maximum(item, 0) % M
        store = store.at[index].set(jnp.where(done, outputs[P - 1], store[index]))
        return (jnp.roll(outputs, 1, axis=0), store), None

    inputs = constrain(jnp.zeros((P, *xs.shape[1:]), xs.dtype), STAGE_ACT, mesh)
    (_, store), _ = jax.lax.scan(tick, (inputs, jnp.zeros_like(xs)), jnp.arange(plan.ticks))
    return merge_microbatches(store, mesh, ("act_batch", "act_seq", "act_embed"))
