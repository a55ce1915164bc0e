"""Logical axis names -> mesh axes: the one rules table, its resolver, and sharding helpers.

Parameters and activations name their dimensions with logical names ("embed", "mlp", "act_batch", ...).
`LOGICAL_RULES` says which mesh axes each name may be split over, in order of preference. Switching
between data parallel, FSDP and tensor parallel is a change of mesh degrees (or of this table), never of
the model.

The resolver is deliberately small and strict (DESIGN.md convention 3): for each dimension it takes the
rule's mesh axes in order and keeps an axis only if it exists in the mesh, has size > 1, is not already
used by another dimension of the same spec, and the product of the kept axes still divides the dimension.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "pipeline", "fsdp", "tensor")

# logical name -> mesh axes it may be split over (in order). Names missing here are replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": ("pipeline",),  # the stacked-layer dimension: contiguous blocks of layers per pipeline stage
    "stage": ("pipeline",),  # the stage dimension of the pipeline's buffers and regrouped weights
    "embed": ("fsdp",),  # ZeRO-3: every weight is split over fsdp along its model dimension
    "vocab": ("tensor",),
    "heads": ("tensor",),  # Megatron: query heads (column-parallel q, row-parallel out)
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),  # Megatron: column-parallel up/gate, row-parallel down
    "norm": (),
    # activations
    # the batch outside the pipelined layers (embedding, LM head, loss) is split over the pipeline stages
    # too, so they do not all repeat that work; inside the pipeline (`rules(act_batch=...)`) it is not
    "act_batch": ("data", "fsdp", "pipeline"),
    "act_seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}

Logical = Sequence[str | None]

_ACTIVE: contextvars.ContextVar[dict[str, tuple[str, ...]]] = contextvars.ContextVar(
    "dsjax_rules", default=LOGICAL_RULES
)


@contextlib.contextmanager
def rules(**changes: tuple[str, ...]):
    """Within the block, resolve (and so `constrain`) uses LOGICAL_RULES with these entries replaced; for
    code traced in the block, e.g. the pipeline's stages, whose batch must not be split over the stages."""
    token = _ACTIVE.set({**_ACTIVE.get(), **changes})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def resolve(
    logical: Logical, shape: Sequence[int], mesh: jax.sharding.Mesh, rules: dict[str, tuple[str, ...]] | None = None
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry the `logical` names (under the rules
    in force: LOGICAL_RULES, or as `rules(...)` changed them)."""
    rules = _ACTIVE.get() if rules is None else rules
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical, shape, strict=True):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the rules table")
        kept: list[str] = []
        product = 1
        for axis in rules.get(name, ()) if name is not None else ():
            degree = mesh.shape.get(axis, 1)
            if axis in used or degree == 1 or size % (product * degree) != 0:
                continue
            kept.append(axis)
            product *= degree
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named(logical: Logical, shape: Sequence[int], mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, resolve(logical, shape, mesh))


def constrain(x: jax.Array, logical: Logical, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Pin an activation's sharding inside jit (no-op without a mesh, e.g. eager single-device use)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named(logical, x.shape, mesh))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical names a dsjax parameter was created with (metadata key 'logical')."""
    logical = variable.get_metadata().get("logical")
    if logical is None:
        raise ValueError(f"variable of shape {variable.get_value().shape} has no 'logical' axis names")
    return tuple(logical)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The NamedSharding of every variable in an (abstract or concrete) NNX state, same tree structure."""

    def one(variable: nnx.Variable):
        return variable.replace(named(logical_axes(variable), variable.get_value().shape, mesh))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def describe(state: nnx.State, mesh: jax.sharding.Mesh) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, spec) rows for every variable, for --dry-run and tests."""
    rows = []
    for path, variable in nnx.to_flat_state(state):
        spec = resolve(logical_axes(variable), variable.get_value().shape, mesh)
        rows.append((".".join(str(p) for p in path), tuple(variable.get_value().shape), str(spec)))
    return rows
