"""The 1F1B pipeline schedule (`value_and_grad_1f1b`): one forward and one backward pass per stage and
tick, the backward pass written into the loop rather than derived by autodiff (see dsjax.pipeline for
the plan, the stage split and the GPipe / circular loop it shares its pieces with)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax import sharding
from dsjax.pipeline import STAGE_ACT, Plan, split_layers, stage_weights
from dsjax.precision import compute_dtype
from dsjax.sharding import constrain

FIRST_GRADS = ("stage", None, "act_batch", "act_seq", "act_embed")  # stage 0's input gradients: (P, M, mb, T, D)


def _stage_residuals(stage, w, x) -> tuple[list[bool], list]:
    """For each residual that `jax.vjp(stage, w, x)` keeps for its backward pass (the leaves of its
    pullback, in order): whether it depends on the stage input x, and its abstract value (shape, dtype,
    memory space: remat.policy=offload keeps some in host memory). The others come from the weights alone
    (the weights, their casts and reshapes, also those made inside the loop over layers): the same for
    every microbatch, so not worth keeping per microbatch."""

    def residuals(w, x):
        return jax.tree.leaves(jax.vjp(stage, w, x)[1])

    closed = jax.make_jaxpr(residuals)(w, x)
    n_weights = len(jax.tree.leaves(w))
    inputs = [i >= n_weights for i in range(len(closed.jaxpr.invars))]
    return _depends(closed.jaxpr, inputs), list(closed.out_avals)


def _depends(jaxpr, inputs: list[bool]) -> list[bool]:
    """Which outputs of `jaxpr` depend on the inputs flagged in `inputs`. A scan's outputs are followed
    through its body (its carries to a fixed point), a call's through the called jaxpr; any other
    equation's outputs depend on its inputs if any of them does."""
    from jax.extend.core import Var

    dependent = {v for v, flag in zip(jaxpr.invars, inputs, strict=True) if flag}
    for eqn in jaxpr.eqns:
        flags = [isinstance(v, Var) and v in dependent for v in eqn.invars]
        if any(flags):
            dependent.update(v for v, flag in zip(eqn.outvars, _equation_depends(eqn, flags), strict=True) if flag)
    return [isinstance(v, Var) and v in dependent for v in jaxpr.outvars]


def _equation_depends(eqn, inputs: list[bool]) -> list[bool]:
    def inner(value):  # the Jaxpr of a Jaxpr or ClosedJaxpr parameter, else None
        value = getattr(value, "jaxpr", value)
        return value if hasattr(value, "eqns") and hasattr(value, "invars") else None

    split = _scan_split(eqn) if eqn.primitive.name == "scan" else None
    if split is not None:
        body, (consts, n_carry) = inner(eqn.params["jaxpr"]), split
        carry = inputs[consts : consts + n_carry]
        while True:
            outputs = _depends(body, inputs[:consts] + carry + inputs[consts + n_carry :])
            merged = [a or b for a, b in zip(carry, outputs[:n_carry], strict=True)]
            if merged == carry:
                return merged + outputs[n_carry:]
            carry = merged
    for value in eqn.params.values() if eqn.primitive.name in _CALLS else ():  # follow the called jaxpr
        called = inner(value)
        if called is not None and len(called.invars) == len(eqn.invars) and len(called.outvars) == len(eqn.outvars):
            return _depends(called, inputs)
    return [True] * len(eqn.outvars)


def _scan_split(eqn) -> tuple[int, int] | None:
    """(constants, carries) among a scan's inputs (the rest are the scanned inputs); None if this jax
    version's scan parameters say it in a way not known here."""
    params = eqn.params
    if "num_consts" in params and "num_carry" in params:  # jax <= 0.10
        return params["num_consts"], params["num_carry"]
    parts = params.get("ft_in")  # jax 0.11: the input types as (constants, carries, scanned inputs)
    if parts is not None and len(parts) == 3 and sum(len(part) for part in parts) == len(eqn.invars):
        return len(parts[0]), len(parts[1])
    return None


# primitives that call one jaxpr once, with the equation's inputs and outputs (a while loop's body, whose
# carries feed back, is not one of them)
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call"}


def value_and_grad_1f1b(
    graphdef,
    params,
    batch: jax.Array,
    mesh: jax.sharding.Mesh,
    plan: Plan,
    seed: jax.Array,
    recompute: bool | None = None,
):
    """(mean next-token loss of `batch`, gradients of seed x that loss) by the one-forward-one-backward
    schedule: the backward pass is not autodiff of the loop but part of it.

    In an SPMD loop of M + 2P - 1 ticks every stage runs, at tick t, the forward pass of microbatch t - s
    and the backward pass of microbatch t - 2P + 1 + s (each where it exists): the last stage's output goes
    through the final norm, LM head and loss (forward and backward), and its gradient starts down the
    stages on the next tick. Between a microbatch's forward and backward pass, a stage keeps the residuals
    of its backward pass (what the remat policy saves: every activation with `none`, each remat group's
    input with `full`) that depend on the microbatch, for at most 2P microbatches (ring buffers of 2P slots),
    whatever M is; the residuals that come from the weights alone are made again in the backward pass
    (from the weights, without the forward pass). No other activation outlives the tick that made it, so
    the memory grows with P, not with M, except for stage 0's input gradients (D values per token of the
    batch, as many as its embeddings), kept for the embedding's backward pass. In the first P ticks no
    stage has a backward pass to run, and in the last P none has a forward pass: those ticks run only the
    half that exists (three loops), so the bubble is (P - 1) / (M + P - 1), as in GPipe. A stage with no
    microbatch of its own at a tick runs on a zero gradient (and the residuals of its latest forward pass),
    which adds zeros to the fp32 weight-gradient accumulators, with no mask in between: with a compute
    dtype other than the weights' and unrolled layers, each matmul weight's gradient goes from its GEMM,
    in fp32, straight into its accumulator (`Decoder.compute_weights`, `layers.project`). This needs the
    backward pass of every block to scale with its cotangent (zero in, zero out), as all of them do.

    With `recompute` (the default when the remat policy offloads residuals to host memory, which device
    ring buffers would bring back), a stage keeps only each microbatch's input and runs its forward pass
    again inside the backward pass: the least memory, for one more forward pass per tick (also in the
    backward-only ticks, which `Plan.bubble` does not count).

    The LM head's work is shared by all stages rather than repeated on each: every tick, stage k runs the
    final norm, LM head and loss (forward and backward) of positions k T/P, ..., (k + 1) T/P - 1 of the
    last stage's microbatch. Each stage accumulates its share of those parameters' gradients separately;
    the shares are summed once, after the last forward pass. Stage 0 keeps its input gradients (the
    embeddings'); after the loop they go to every stage, which runs the embedding's backward pass for
    every microbatch at once.
    """
    with sharding.rules(act_batch=("data", "fsdp")):
        return _one_f_one_b(graphdef, params, batch, mesh, plan, seed, recompute)


def _one_f_one_b(graphdef, params, batch, mesh, plan, seed, recompute):
    from flax import nnx

    from dsjax.models.layers import Precast
    from dsjax.sharding import logical_axes
    from dsjax.step import microbatches

    keystr = jax.tree_util.keystr
    model = nnx.merge(graphdef, params)
    P, M = plan.stages, plan.microbatches
    K = 2 * P  # ring slots per stage: a microbatch's forward and backward pass on stage s are 2P - 1 - 2s ticks apart
    rows, T = batch.shape[0], batch.shape[1] - 1
    S = T // P  # positions of a microbatch whose head and loss each stage computes
    weights = stage_weights(model.blocks.arrays(), model.block_logical(), P, 1, mesh)
    weights = {name: w[:, 0] for name, w in weights.items()}  # one chunk per stage: (P, c, ...)
    blocks, rest = nnx.split_state(params, nnx.PathContains("blocks"), ...)  # the stages' weights; all the others
    # What the ticks compute with, made once before the loop rather than at every tick (XLA does not hoist
    # these casts and slices out of the loop by itself): the weights in the compute dtype, one array per
    # layer when the layers are unrolled (slices of a stacked array would be copied at every tick), and the
    # LM head matrix in the compute dtype. The matmul weights and the head come as `Precast` pairs: their
    # gradients leave the GEMMs in fp32, straight into the fp32 accumulators (`layers.project`); the other
    # weights' gradients are the same values as those of the fp32 weights through the cast.
    layer_weights = model.compute_weights(weights)
    if not model.cfg.scan_layers:
        layer_weights = split_layers(layer_weights, 1, next(iter(weights.values())).shape[1])
    is_precast = lambda x: isinstance(x, Precast)  # noqa: E731
    masters = jax.tree.map(lambda w: w.master if is_precast(w) else w, layer_weights, is_leaf=is_precast)
    dtype = jnp.dtype(compute_dtype(model.policy.compute))
    head_cast = model.head().astype(dtype)
    tokens = microbatches(batch, M, mesh)  # (M, mb, T + 1)
    stage = model.stage_fn(T, mesh)
    cotangent = (seed / (rows * T)).astype(jnp.float32)  # d(seed * mean loss) / d(sum of token losses)

    def per_stage(valid):  # (P,) -> broadcastable over (P, ...)
        return lambda a: jnp.where(valid.reshape(P, *([1] * (a.ndim - 1))), a, jnp.zeros_like(a))

    def pieces(a):  # (mb, T, ...) -> (P, mb, S, ...): stage k's positions k S, ..., (k + 1) S - 1
        split = a.reshape(a.shape[0], P, S, *a.shape[2:]).swapaxes(0, 1)
        return constrain(split, ("stage", "act_batch", "act_seq", "act_embed")[: split.ndim], mesh)

    def whole(a):  # (P, mb, S, ...) -> (mb, T, ...)
        return a.swapaxes(0, 1).reshape(a.shape[1], T, *a.shape[3:])

    def tail_backward(rest, y, labels, valid):  # one stage's positions of the last stage's microbatch
        def tail(rest, y):
            m = nnx.merge(graphdef, blocks, rest)
            head = m.head()
            head = Precast(head, head_cast) if head.dtype != head_cast.dtype else head
            return m.token_losses(m.final_norm_fn(y, mesh), head, labels, mesh).sum()

        loss, pull = jax.vjp(tail, rest, y)
        grads, y_grad = pull(jnp.where(valid, cotangent, 0.0))  # no valid microbatch: zero gradients, as below
        return jnp.where(valid, loss, 0.0), grads, jnp.where(valid, y_grad, 0)

    def embed_backward(rest, tok, g):  # every microbatch: tokens (M, mb, T), their input gradients (M, mb, T, D)
        def embed_all(rest):
            m = nnx.merge(graphdef, blocks, rest)
            return jax.vmap(lambda tok: m.embed_tokens(tok, mesh))(tok)

        _, pull = jax.vjp(embed_all, rest)
        return pull(g)[0]

    def embed(tok):
        return nnx.merge(graphdef, params).embed_tokens(tok, mesh)

    def add(acc, grads):
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)

    def master_grads(grads):  # layer_weights' gradients, a Precast's the one of its master weight
        return jax.tree.map(lambda w, g: g.master if is_precast(w) else g, layer_weights, grads, is_leaf=is_precast)

    def stacked(grads):  # layer_weights' gradients as {name: (P, c, ...)}
        if not isinstance(grads, list):
            return grads
        return {name: jnp.stack([g[name] for g in grads], axis=1) for name in grads[0]}

    D = model.cfg.d_model
    micro = tokens.shape[1]
    x_spec = jax.ShapeDtypeStruct((micro, T, D), dtype)
    w_spec = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape[1:], w.dtype), layer_weights)
    kept_flags, residual_specs = _stage_residuals(stage, w_spec, x_spec)

    kept_specs = [r for r, kept in zip(residual_specs, kept_flags, strict=True) if kept]
    # remat.policy=offload moves residuals to host memory: kept in device ring buffers, they would come back
    # (and XLA computes on host memory on the way: measured 1.7x slower). Then each stage keeps only its
    # input and runs its forward pass again in the backward pass, where offloading works as usual.
    if recompute is None:
        recompute = any(getattr(r, "memory_space", None) == jax.memory.Space.Host for r in kept_specs)
    kept_specs = [x_spec] if recompute else kept_specs

    def stage_forward(w, x):  # the stage's output, and the residuals of its backward pass that depend on x
        if recompute:
            return stage(w, x), [x]
        y, pull = jax.vjp(stage, w, x)
        kept = [r for r, k in zip(jax.tree.leaves(pull), kept_flags, strict=True) if k]
        for r, spec in zip(kept, kept_specs, strict=True):  # the same residuals as _stage_residuals traced
            if (r.shape, r.dtype) != (spec.shape, spec.dtype):
                raise RuntimeError(f"1F1B: a stage residual is {r.dtype}{r.shape}, traced as {spec.dtype}{spec.shape}")
        return y, kept

    def stage_backward(w, kept, g):
        if recompute:
            return jax.vjp(stage, w, kept[0])[1](g)
        # The residuals that come from the weights alone, taken from a pullback at a dummy input: the rest of
        # that forward pass is unused, and XLA removes it.
        _, pull = jax.vjp(stage, w, jnp.zeros(x_spec.shape, x_spec.dtype))
        leaves, treedef = jax.tree.flatten(pull)
        kept = iter(kept)
        leaves = [next(kept) if k else leaf for leaf, k in zip(leaves, kept_flags, strict=True)]
        return jax.tree.unflatten(treedef, leaves)(g)

    stage_axis = sharding.resolve(("stage",), (P,), mesh) if mesh is not None else ()

    def ring_constrain(ring):  # (P, K, ...): split over the stages; XLA picks the rest of the layout
        if mesh is None:
            return ring
        inner = [jax.sharding.PartitionSpec.UNCONSTRAINED] * (ring.ndim - 2)
        spec = jax.sharding.PartitionSpec(stage_axis[0] if len(stage_axis) else None, None, *inner)
        return jax.lax.with_sharding_constraint(ring, jax.sharding.NamedSharding(mesh, spec))

    forward = jax.vmap(stage_forward, spmd_axis_name="pipeline")
    backward = jax.vmap(stage_backward, spmd_axis_name="pipeline")
    tails = jax.vmap(tail_backward, in_axes=(None, 0, 0, None), spmd_axis_name="pipeline")

    def write(ring, t, x):  # every stage writes slot t mod K (one index for all: an in-place update)
        return jax.lax.dynamic_update_index_in_dim(ring, x[:, None], t % K, 1)

    read = jax.vmap(lambda ring, i: jax.lax.dynamic_index_in_dim(ring, i, 0, keepdims=False), spmd_axis_name="pipeline")
    slot = jnp.arange(P)

    def tick(carry, t, forward_pass=True, backward_pass=True):
        new = dict(carry)  # the carry of the next tick; `carry` stays what this tick started from
        if forward_pass:
            # forward: stage s runs microbatch t - s; stage 0 takes it from the embedding
            first = embed(tokens[jnp.minimum(t, M - 1)][:, :-1])
            inputs = jnp.where((slot == 0)[:, None, None, None], first[None], jnp.roll(carry["sent"], 1, axis=0))
            inputs = constrain(inputs, STAGE_ACT, mesh)
            outputs, kept = forward(layer_weights, inputs)
            outputs = constrain(outputs, STAGE_ACT, mesh)
            new["rings"] = [ring_constrain(write(ring, t, r)) for ring, r in zip(carry["rings"], kept, strict=True)]
            # the last stage's microbatch through the final norm, LM head and loss, forward and backward, its
            # positions split over the stages
            item = t - (P - 1)
            done = (item >= 0) & (item < M)
            labels = tokens[jnp.clip(item, 0, M - 1)][:, 1:]
            losses, tail_grads, y_grads = tails(rest, pieces(outputs[P - 1]), pieces(labels), done)
            new.update(sent=outputs, last_grad=whole(y_grads), total=carry["total"] + losses.sum())
            new["rest_grads"] = add(carry["rest_grads"], tail_grads)
        if backward_pass:
            # backward: stage s runs microbatch t - 2P + 1 + s, from its saved residuals and the gradient that
            # the stage above (or, for the last stage, the loss) produced at the previous tick
            item_b = t - 2 * P + 1 + slot
            valid = (item_b >= 0) & (item_b < M)
            incoming = jnp.roll(carry["returned"], -1, axis=0)
            incoming = jnp.where((slot == P - 1)[:, None, None, None], carry["last_grad"][None], incoming)
            # A stage with no valid microbatch runs its backward pass on a zero gradient (its weight gradients
            # are zeros, which the accumulators add as they leave their GEMMs, `layers.project`: a mask between
            # the two would cost a pass over every gradient at every tick).
            incoming = constrain(per_stage(valid)(incoming), STAGE_ACT, mesh)
            # A valid stage reads the slot it wrote at its microbatch's forward tick, t - 2P + 1 + 2s (never the
            # slot this tick's forward pass wrote); an idle one the slot of its latest forward tick, which is
            # this tick's slot up to the last forward tick, M + P - 2 (real residuals, whose backward pass is
            # finite; a slot not yet written holds zeros, whose backward pass is not). Read after this tick's
            # write, so that the rings are updated in place rather than kept twice.
            written = jnp.where(valid, (item_b + slot) % K, jnp.minimum(t, M + P - 2) % K)
            kept = [read(ring, written) for ring in new["rings"]]
            weight_grads, returned = backward(layer_weights, kept, incoming)
            new["block_grads"] = add(carry["block_grads"], master_grads(weight_grads))
            new["returned"] = constrain(per_stage(valid)(returned), STAGE_ACT, mesh)
            # Every stage keeps its input gradient in its own part of a store split over the stages (no data
            # moves); stage 0's part, the embeddings' gradients, is used after the loop. Before microbatch
            # 0's it is not valid; microbatch 0's overwrites it.
            index = jnp.maximum(t - 2 * P + 1, 0)
            first_grads = jax.lax.dynamic_update_index_in_dim(carry["first_grads"], returned[:, None], index, 1)
            new["first_grads"] = constrain(first_grads, FIRST_GRADS, mesh)
        return new, None

    def stage_zeros(variable):  # a (P, ...) fp32 accumulator of one parameter's per-stage gradient shares
        zeros = jnp.zeros((P, *variable.get_value().shape), jnp.float32)
        return variable.replace(constrain(zeros, ("stage", *logical_axes(variable)), mesh))

    acts = constrain(jnp.zeros((P, micro, T, D), dtype), STAGE_ACT, mesh)
    carry = dict(
        sent=acts,
        returned=acts,
        last_grad=jnp.zeros((micro, T, D), dtype),
        rings=[ring_constrain(jnp.zeros((P, K, *r.shape), r.dtype)) for r in kept_specs],
        block_grads=jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), masters),
        rest_grads=jax.tree.map(stage_zeros, rest, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        first_grads=constrain(jnp.zeros((P, M, micro, T, D), dtype), FIRST_GRADS, mesh),
        total=jnp.zeros((), jnp.float32),
    )
    # Ticks 0, ..., P - 1 hold no valid backward pass (the first one reaches the last stage at tick P) and
    # ticks M + P - 1, ..., M + 2P - 2 no valid forward pass: those phases leave the idle half out.
    carry, _ = jax.lax.scan(functools.partial(tick, backward_pass=False), carry, jnp.arange(P))
    carry, _ = jax.lax.scan(tick, carry, jnp.arange(P, M + P - 1))
    # The LM head's and final norm's gradients are complete after the last forward pass: their per-stage
    # shares are summed here, before the backward-only loop (which does not carry them), so that XLA can
    # overlap that all-reduce with the loop instead of running it after.
    rest_grads = {keystr(path): g.sum(0) for path, g in jax.tree_util.tree_leaves_with_path(carry.pop("rest_grads"))}
    total = carry.pop("total")
    carry, _ = jax.lax.scan(functools.partial(tick, forward_pass=False), carry, jnp.arange(M + P - 1, M + 2 * P - 1))
    # The embedding's backward pass, once for all microbatches: stage 0's input gradients go to every stage
    # (D values per token, far less than the table), and each stage scatters them into its own copy of the
    # table's gradient, which then needs no sum over the stages.
    first_grads = constrain(carry["first_grads"][0], (None, "act_batch", "act_seq", "act_embed"), mesh)
    embed_grads = embed_backward(rest, tokens[:, :, :-1], first_grads)
    for path, g in jax.tree_util.tree_leaves_with_path(embed_grads):
        rest_grads[keystr(path)] = rest_grads[keystr(path)] + g.astype(jnp.float32)
    block_grads = stacked(carry["block_grads"])

    def assemble(path, p):
        key = keystr(path)
        if key in rest_grads:
            return rest_grads[key].astype(p.dtype)
        name = next(name for name in block_grads if key.startswith(f"['blocks']['{name}']"))
        return block_grads[name].reshape(p.shape).astype(p.dtype)

    grads = jax.tree_util.tree_map_with_path(assemble, params)
    return total / (rows * T), grads
