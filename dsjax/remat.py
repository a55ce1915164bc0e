"""Activation rematerialisation: named policies over the model's `checkpoint_name` tags.

The decoder tags its intermediate tensors (MaxText's names):
    query_proj, key_proj, value_proj   q, k, v after their projections          (B, T, N|K, H)
    context                            attention output before the out proj    (B, T, N, H)
    out_proj                           attention output projection (gpt2: before its bias)  (B, T, D)
    mlpwi_0, mlpwi_1                   MLP up/gate projections (F-wide)        (B, T, F)
    mlpwo                              MLP block output                        (B, T, D)

A policy says which of them the backward pass may keep; everything else inside a checkpointed group
of layers is recomputed from the group's input. `none` checkpoints nothing (all activations kept).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import checkpoint_policies as cp

ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj")

# The primitive whose outputs are the fused (cuDNN) attention's output and softmax statistics, the
# residuals of its backward kernel.
FUSED_ATTENTION_FWD = "dot_product_attention_fwd_wrapper"


def _dots_and_fused_attention(prim, *avals, **params) -> bool:
    return prim.name == FUSED_ATTENTION_FWD or cp.dots_with_no_batch_dims_saveable(prim, *avals, **params)


def _weight_dots(batch_dims: int) -> Callable:
    """`dots_with_no_batch_dims_saveable` for blocks run under `batch_dims` vmaps whose weights are batched
    too (a pipeline's stages: each has its own weights). There a weight matmul gets one batch dimension
    per vmap, and the JAX policy, which sees the batched program, would save none of them; attention's
    score and context matmuls, which it must not save, keep their own batch dimensions on top."""

    def saveable(prim, *_, **params) -> bool:
        if prim.name != "dot_general":
            return False
        (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        return len(lhs_batch) <= batch_dims and len(rhs_batch) <= batch_dims

    return saveable


def policy_for(policy: str, batch_dims: int = 0) -> Callable | None:
    """The `jax.checkpoint` policy named `policy`, for blocks run under `batch_dims` vmaps with batched
    weights (see `_weight_dots`; only the `dots` policies look at batch dimensions)."""
    if batch_dims and policy == "dots":
        return _weight_dots(batch_dims)
    if batch_dims and policy == "dots_attention":
        dots = _weight_dots(batch_dims)
        return lambda prim, *avals, **params: prim.name == FUSED_ATTENTION_FWD or dots(prim, *avals, **params)
    return REMAT_POLICIES[policy]


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": cp.nothing_saveable,  # keep only each group's input
    "dots": cp.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs, recompute attention/elementwise
    # dots, plus the fused attention kernel's output and softmax statistics, so the backward pass does not
    # run the attention forward again; the same as dots where attention is not the fused kernel (CPU, XLA)
    "dots_attention": _dots_and_fused_attention,
    "qkv_out": cp.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
    # everything but the F-wide MLP intermediates, the largest activations of a block
    "minimal": cp.save_only_these_names(*ATTENTION_NAMES, "mlpwo"),
    # like `minimal`, but kept in host memory and brought back for the backward pass
    "offload": cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[*ATTENTION_NAMES, "mlpwo"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}

OFFLOAD_PLATFORMS = ("gpu", "tpu")


def check_platform(policy: str, platform: str) -> None:
    """`offload` needs a backend with pinned host memory (GPU, TPU)."""
    from dsjax.config import ConfigError

    if policy == "offload" and platform not in OFFLOAD_PLATFORMS:
        raise ConfigError(
            f"remat.policy='offload' keeps saved activations in pinned host memory, which the {platform} "
            "backend does not have; use it on a GPU or TPU, or choose remat.policy=minimal (same saved "
            "tensors, kept on the device) or full."
        )


def scan_layers(
    block: Callable,
    x: jax.Array,
    stacked: dict,
    policy: str = "none",
    every: int = 1,
    unroll: bool = False,
    batch_dims: int = 0,
    prevent_cse: bool = False,
) -> jax.Array:
    """Apply `block(layer_params, x) -> x` for each layer of `stacked` ({name: (L, ...)}), scanned; or, for
    a list of per-layer parameter dicts, in a Python loop (unrolled, as `unroll=True`).

    With a policy other than `none`, layers run in groups of `every`, each group under `jax.checkpoint`:
    the backward pass keeps the group's input plus whatever the policy saves and recomputes the rest.
    `unroll=True` emits every layer into the program instead of a loop over one compiled body: the same
    arithmetic, a longer compile, and XLA may schedule and fuse across layer boundaries. `batch_dims`: how
    many vmaps with batched weights the caller runs this under (`policy_for`). `prevent_cse` (remat.prevent_cse):
    put the backward pass's recomputation behind barriers, so that XLA cannot merge it with the forward pass
    and keep the forward pass's intermediates alive until the backward pass (`jax.checkpoint`'s
    prevent_cse); it only matters where XLA sees the layers as straight-line code (`unroll` or a list).
    """

    def one(x, layer):
        return block(layer, x), None

    if isinstance(stacked, list):  # separate arrays per layer: no layer slices of a stacked array to take
        return _layer_list(block, x, stacked, policy, every, batch_dims, prevent_cse)
    if policy == "none":
        return jax.lax.scan(one, x, stacked, unroll=unroll)[0]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    grouped = jax.tree.map(lambda a: a.reshape(n_layers // every, every, *a.shape[1:]), stacked)

    def group(x, layers):
        return jax.lax.scan(one, x, layers, unroll=unroll)[0]

    # Inside a rolled scan XLA cannot merge the recomputation into the forward pass anyway; unrolled, it can
    # (llama-1b: 7.1 GiB more at batch 12 without the barriers, and a 1.35% faster step; experiments/RESULTS.md).
    group = jax.checkpoint(group, policy=policy_for(policy, batch_dims), prevent_cse=prevent_cse)
    return jax.lax.scan(lambda x, layers: (group(x, layers), None), x, grouped, unroll=unroll)[0]


def _layer_list(
    block: Callable, x: jax.Array, layers: list[dict], policy: str, every: int, batch_dims: int, prevent_cse: bool
) -> jax.Array:
    """scan_layers over a list of per-layer parameter dicts: the same groups of `every` layers under
    `jax.checkpoint` with the same policy, the same arithmetic as the unrolled scan."""

    def group(x, layers):
        for layer in layers:
            x = block(layer, x)
        return x

    if policy == "none":  # no groups: `every` does not apply (as in the scanned form)
        return group(x, layers)
    group = jax.checkpoint(group, policy=policy_for(policy, batch_dims), prevent_cse=prevent_cse)
    if len(layers) % every:
        raise ValueError(f"scan_layers: {len(layers)} layers do not split into groups of {every}")
    for start in range(0, len(layers), every):
        x = group(x, layers[start : start + every])
    return x
