"""Pipeline parallelism over the mesh's `pipeline` axis: GPipe, circular (interleaved) and 1F1B schedules.

The decoder's stacked layers (L, ...) are cut into P * R chunks of c = L / (P * R) consecutive layers;
chunk k runs on stage k mod P, so stage s holds chunks s, s + P, ..., s + (R - 1) P (GPipe: R = 1, one
chunk of L / P layers per stage). The global batch is split into M microbatches with the same strided
split as gradient accumulation (`dsjax.step.microbatches`).

The schedule is one SPMD loop of R * M + P - 1 ticks (straight-line code, or with `Plan.unroll` off scans:
2R - 1 of them for the circular schedule, see `_run`), written for GSPMD (no hand-written collectives):
a buffer of P stage inputs, sharded over the pipeline axis, goes through `vmap(stage)` (each device runs
its own stage on its own slot), then rolls by one slot, which XLA lowers to a collective permute between
neighbouring stages. At tick t stage s works on item t - s: microbatch (t - s) mod M in repeat
(t - s) // M. Stage 0 takes a fresh microbatch in repeat 0 and, with R > 1, the last stage's output of
the previous repeat otherwise (kept in a per-microbatch store, which needs M >= P). The roll brings the
last stage's output to stage 0's slot, and the store keeps it there (a store split over the stages, whose
stage-0 part alone is used): only the result of the whole loop leaves stage 0, once per step. Autodiff
of the loop gives the backward pass in reverse tick order: all forward work, then all backward work
(GPipe), with the activations of every tick kept (or rematerialised as the remat policy says). Idle slots
(the bubble, a fraction (P - 1) / (R M + P - 1) of the ticks) compute on zeros or stale activations
whose outputs are never used, so they contribute nothing to the loss or the gradients.

1F1B (`dsjax.pipeline_1f1b.value_and_grad_1f1b`) is a different loop: the backward pass is written into it instead of
derived by autodiff, so each tick holds one forward and one backward pass per stage and a stage keeps the
backward pass's residuals of at most 2P microbatches (see its docstring); its forward-only uses
(evaluation) run the GPipe loop.

Outside the pipelined layers (embedding, final norm, LM head, loss) the batch is split over the pipeline
axis as well as data and fsdp (`act_batch`), so the stages share that work instead of repeating it; inside
the loop `sharding.rules` takes the pipeline axis out of `act_batch`, since a stage holds whole microbatches.
(1F1B, which runs the LM head and loss inside its loop, splits each microbatch's positions instead.)

The stored parameters keep the canonical layer order (a checkpoint does not depend on the pipeline
layout) with the layer axis split over the pipeline axis in contiguous blocks. For GPipe that block is
exactly the stage's chunk; for the circular schedule the chunks of a stage are not contiguous, so every
step regroups the block weights across stages (an all-to-all of the layer weights, and of their
gradients in the backward pass).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsjax import sharding
from dsjax.config import Config, ConfigError, PipelineConfig
from dsjax.sharding import constrain

STAGE_ACT = ("stage", "act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a step is pipelined: P stages, M microbatches, R chunks per stage."""

    stages: int
    microbatches: int
    repeats: int
    schedule: str
    # GPipe and circular: the ticks as straight-line code (a Python loop) rather than a scan. A scan stacks
    # each tick's saved activations over the ticks (the optimized HLO copies saved matmul outputs into the
    # stacks) and is one loop body to XLA's scheduler. Straight-line GPipe and circular measured 5-7% faster
    # (llama-1b, 2 stages) and took 8-9 GiB more, most of it memory XLA's scheduler takes where the allocator
    # has room; it compiles in proportion to the ticks (experiments/RESULTS.md, 2026-11-30).
    unroll: bool = True

    @classmethod
    def of(cls, p: PipelineConfig, stages: int) -> Plan:
        """The plan `p` (the run's `pipeline` config) asks for on `stages` stages, unchecked (`make_plan`
        checks it): M defaults to one microbatch per stage, and 1F1B's forward-only uses of the GPipe loop
        (evaluation, a custom objective) keep the scans."""
        unroll = p.unroll and p.schedule != "1f1b"
        return cls(stages, p.microbatches or stages, p.repeats, p.schedule, unroll)

    @property
    def ticks(self) -> int:
        if self.schedule == "1f1b":  # P forward-only ticks, M - 1 ticks of both, P backward-only ticks
            return self.microbatches + 2 * self.stages - 1
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of the stages' time that does no useful work: (P - 1) / (R M + P - 1) for GPipe and
        circular (whose loop runs forward ticks, then autodiff's backward ticks). For 1F1B too, (P - 1) /
        (M + P - 1): its P forward-only and P backward-only ticks together cost P forward-and-backward
        ticks, so its loop costs M + P - 1 of them, for M microbatches."""
        if self.schedule == "1f1b":
            return (self.stages - 1) / (self.microbatches + self.stages - 1)
        return (self.ticks - self.repeats * self.microbatches) / self.ticks

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
        loop = "" if self.schedule == "1f1b" else "unrolled " if self.unroll else "scanned "
        return (
            f"pipeline: {self.schedule}, {self.stages} stages x {self.repeats} chunk(s), {self.microbatches} "
            f"microbatches, {self.ticks} {loop}ticks, bubble {100 * self.bubble:.1f}% ({stages})"
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
    if p.schedule == "1f1b" and t.loss_chunk:
        raise ConfigError(
            f"train.loss_chunk ({t.loss_chunk}) does not apply to pipeline.schedule=1f1b, whose loss already runs "
            "one microbatch at a time; set --train.loss_chunk=0."
        )
    if p.schedule == "1f1b" and t.seq_len % P:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) must be divisible by mesh.pipeline ({P}) for pipeline.schedule=1f1b: "
            "each stage runs the LM head and loss of an equal share of every microbatch's positions."
        )
    if R > 1 and M < P:
        raise ConfigError(
            f"the circular schedule needs pipeline.microbatches >= mesh.pipeline ({M} < {P}): a microbatch "
            "comes back to stage 0 for its next chunk only after all stages have passed it on."
        )
    return Plan.of(p, P)


def run(
    stage: Callable[[dict, jax.Array], jax.Array],
    x: jax.Array,
    stacked: dict[str, jax.Array],
    logical: dict[str, tuple],
    plan: Plan,
    mesh: jax.sharding.Mesh,
    cast: Callable[[dict], dict] | None = None,
    per_layer: bool = False,
) -> jax.Array:
    """All layers of `stacked` ({name: (L, ...)}, with the logical axis names in `logical`) applied to
    x (B, T, D) by the pipeline schedule; `stage(chunk, x)` runs one chunk ({name: (c, ...)}, or with
    `per_layer` a list of c per-layer dicts) on one microbatch (mb, T, D).

    `cast` (weights -> the weights the blocks compute with, e.g. in bf16, or `Precast` pairs) runs once,
    before the loop, and the ticks use its result; the gradients still reach `stacked` in its own dtype,
    summed over the ticks in that dtype (see `_for_ticks`). Otherwise XLA casts (and, with `per_layer`,
    slices out each layer's weights) again at every tick."""
    with sharding.rules(act_batch=("data", "fsdp")):  # each stage holds whole microbatches
        return _run(stage, x, stacked, logical, plan, mesh, cast, per_layer)


@jax.custom_vjp
def _cast_once(w: jax.Array, w_cast: jax.Array) -> jax.Array:
    """`w_cast` (w cast once, before a loop), differentiated as `w.astype(w_cast.dtype)` would be: the
    cotangent goes to w in w's dtype, and none to `w_cast` (pass it through `stop_gradient`). Inside a
    scan, the loop then reuses the one cast while its transpose still sums w's gradient in w's dtype (a
    cast made outside the loop and differentiated through would have it summed in the cast's dtype)."""
    return w_cast


def _cast_once_fwd(w, w_cast):
    return w_cast, jnp.zeros((), w.dtype)


def _cast_once_bwd(w_dtype, g):
    return g.astype(w_dtype.dtype), None


_cast_once.defvjp(_cast_once_fwd, _cast_once_bwd)


def split_layers(tree: dict, axis: int, n: int) -> list[dict]:
    """{name: (..., n, ...)} (or a `Precast` of two) with the layers on `axis` -> n dicts, one per layer."""
    pick = [functools.partial(jax.lax.index_in_dim, index=i, axis=axis, keepdims=False) for i in range(n)]
    return [jax.tree.map(layer, tree) for layer in pick]


def _for_ticks(w: jax.Array, c):
    """What a tick hands the blocks for weight w given its cast c (`cast` of the weights, made before the
    loop): a `Precast` as it is (its gradient goes to w through `layers.project`), w itself where the cast
    keeps its dtype, else the cast with w's gradient summed in w's dtype (`_cast_once`)."""
    from dsjax.models.layers import Precast

    if isinstance(c, Precast):
        return c
    return w if c.dtype == w.dtype else _cast_once(w, jax.lax.stop_gradient(c))


def stage_weights(stacked: dict, logical: dict, stages: int, repeats: int, mesh) -> dict:
    """Stacked layer weights (L, ...) as (P, R, c, ...), split over the pipeline axis by stage: stage s,
    repeat r holds chunk r * P + s (layers (r P + s) c, ..., (r P + s + 1) c - 1)."""

    def regroup(name, a):
        c = a.shape[0] // (stages * repeats)
        grouped = a.reshape(repeats, stages, c, *a.shape[1:]).swapaxes(0, 1)
        return constrain(grouped, ("stage", None, None, *logical[name][1:]), mesh)

    return {name: regroup(name, a) for name, a in stacked.items()}


def _run(stage, x, stacked, logical, plan, mesh, cast, per_layer):
    from dsjax.step import merge_microbatches, microbatches

    P, M, R = plan.stages, plan.microbatches, plan.repeats
    weights = stage_weights(stacked, logical, P, R, mesh)  # (P, R, c, ...)
    casts = cast(weights) if cast is not None else weights
    if per_layer:
        c = next(iter(weights.values())).shape[2]
        weights, casts = split_layers(weights, 2, c), split_layers(casts, 2, c)
    xs = microbatches(x, M, mesh, ("act_batch", "act_seq", "act_embed"))  # (M, mb, T, D)
    slot = jnp.arange(P)
    run_stages = jax.vmap(stage, spmd_axis_name="pipeline")
    # The last stage's outputs are kept where they arrive, in stage 0's slot of a store split over the
    # stages (the roll at the end of each tick carries them there): no tick moves them to other stages.
    store_axes = ("stage", None, "act_batch", "act_seq", "act_embed")

    def record(store, inputs, t):  # inputs[0] holds the last stage's output of item t - P
        item = t - P
        keep = (item >= 0) & (item < R * M) & (slot == 0)
        index = jnp.maximum(item, 0) % M
        kept = jnp.where(keep[:, None, None, None], inputs, store[:, index])
        return constrain(store.at[:, index].set(kept), store_axes, mesh)

    def chunk_of(repeat: int):  # (P, R, ...) -> (P, ...): every stage's chunk `repeat`, and its cast
        return jax.tree.map(lambda a: a[:, repeat], (weights, casts))

    def tick(chunk, carry, t):
        inputs, store = carry  # (P, mb, T, D) stage inputs, (P, M, mb, T, D) last-stage outputs
        store = record(store, inputs, t)
        # stage 0: repeat 0 takes a fresh microbatch, a later repeat the last stage's output of the one before
        first = jnp.where(t < M, xs[t % M][None], store[:, t % M])
        inputs = constrain(jnp.where((slot == 0)[:, None, None, None], first, inputs), STAGE_ACT, mesh)
        chunk = jax.tree.map(_for_ticks, *chunk)  # in the loop: see `_cast_once`
        outputs = constrain(run_stages(chunk, inputs), STAGE_ACT, mesh)
        return (jnp.roll(outputs, 1, axis=0), store), None

    def segment(carry, start: int, stop: int, chunk_at):  # never empty: M >= P wherever R > 1
        if plan.unroll:  # straight-line ticks: see `Plan.unroll`
            for t in range(start, stop):
                carry, _ = tick(chunk_at(t), carry, t)
            return carry
        carry, _ = jax.lax.scan(lambda c, t: tick(chunk_at(t), c, t), carry, jnp.arange(start, stop))
        return carry

    # At tick t stage s runs chunk (t - s) // M (clipped to [0, R)). The ticks where every stage runs the same
    # chunk r form one segment (a scan, or straight-line ticks) whose chunk is fixed: sliced once, before it,
    # and kept once for the backward pass, whose weight gradients sum over its ticks (in a scan, in its carry,
    # a `Precast`'s straight into its fp32 GEMM output; unrolled, as autodiff's sum over the uses). Only the
    # P - 1 ticks after each chunk boundary, where stages s <= t - r M have moved on to chunk r and the later
    # ones are still on r - 1, pick each stage's chunk with a select. (One scan whose ticks gathered each
    # stage's chunk kept a copy of the weights per tick, and summed their gradients by scatter.)
    inputs = constrain(jnp.zeros((P, *xs.shape[1:]), xs.dtype), STAGE_ACT, mesh)
    store = constrain(jnp.zeros((P, *xs.shape), xs.dtype), store_axes, mesh)
    carry = (inputs, store)
    ticks = R * M + P - 1  # the forward loop (also 1F1B's forward-only uses, whose own loop is longer)
    for r in range(R):
        fixed = chunk_of(r)
        if r > 0:
            before = chunk_of(r - 1)

            def mixed(t, fixed=fixed, before=before, boundary=r * M):
                moved = slot <= t - boundary  # the stages already on chunk r

                def pick(a, b):
                    return jnp.where(moved.reshape((P,) + (1,) * (a.ndim - 1)), a, b)

                return jax.tree.map(pick, fixed, before)

            carry = segment(carry, r * M, r * M + P - 1, mixed)
        start = 0 if r == 0 else r * M + P - 1
        stop = ticks if r == R - 1 else (r + 1) * M
        carry = segment(carry, start, stop, lambda t, fixed=fixed: fixed)
    inputs, store = carry
    store = record(store, inputs, ticks)  # the last tick's output
    return merge_microbatches(store[0], mesh, ("act_batch", "act_seq", "act_embed"))
