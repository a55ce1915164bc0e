"""Softmax cross-entropy of LM-head logits: the loss and the gradient of each position's loss in one step.

`loss_and_unit_grad(logits, labels)` returns, per position, loss = logsumexp(logits) - logits[label] (fp32)
and the gradient of that loss with respect to the logits, softmax(logits) - onehot(label), written in the
compute dtype. The LM head's backward pass then needs only the gradient (scaled by each position's
cotangent after its GEMMs), not the logits: the fp32 logits die in the forward pass.

Two implementations of the same function:
- 'xla': jnp; XLA runs it as a reduction over the logits (max and sum of exponentials in one pass) and an
  elementwise pass that writes the gradient, each a full read of the logits from device memory.
- 'pallas': one Pallas (Triton) kernel, one program per row of logits: a loop over the row for the running
  max and sum of exponentials, then a second loop that writes the gradient. Same passes, less time than
  XLA's two kernels on an H200 (experiments/RESULTS.md). Rows are split over the devices by
  `jax.shard_map` along the logits' batch sharding; a vocabulary split over devices (tensor parallelism)
  keeps 'xla', whose reductions GSPMD partitions itself.
`impl='auto'` picks 'pallas' on GPUs when the vocabulary is not split, 'xla' elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.config import LOSS_KERNELS, ConfigError
from dsjax.models.layers import activation_spec, as_rows, sharding_platform, splits_last_axis

# logits of a row read per loop iteration (a power of two, as Triton needs) and warps per row, by the bytes of
# a logit: the fastest of 1024-8192 and 2-16 warps on an H200 (experiments/bench_loss_kernel.py,
# experiments/RESULTS.md). 16-bit logits take 4 warps (16 bytes per thread per load): 3.07 against 3.44 ms
# with 8 on gpt2-124m's (32768 x 50304) bf16 logits.
BLOCK = 2048
NUM_WARPS = {2: 4, 4: 8}


def logsumexp(x: jax.Array) -> jax.Array:
    """log(sum(exp(x))) over the last axis, in one pass over x: a running (max, sum of exp(x - max)) pair,
    rescaled whenever the max grows (the online softmax). `jax.nn.logsumexp` reads x twice, first for
    the max, then for the sum; over the (B, T, V) logits each pass is a full read of the step's largest
    tensor. Agrees with it to fp32 rounding (the rescaling adds a few ulps)."""

    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)
        # where(): never exp(-inf - -inf) = nan for the (-inf, 0) identity
        return m, jnp.where(m1 == m, s1, s1 * jnp.exp(m1 - m)) + jnp.where(m2 == m, s2, s2 * jnp.exp(m2 - m))

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype))
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), init, combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _lse_and_picked(wide: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return logsumexp(wide), jnp.take_along_axis(wide, labels[..., None], axis=-1)[..., 0]


def loss_only(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position cross-entropy (fp32) of logits (..., V) against integer labels (...): no gradient."""
    lse, picked = _lse_and_picked(logits.astype(jnp.float32), labels)
    return lse - picked


def _xla(logits: jax.Array, labels: jax.Array, grad_dtype) -> tuple[jax.Array, jax.Array]:
    wide = logits.astype(jnp.float32)
    lse, picked = _lse_and_picked(wide, labels)
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    grad = (jnp.exp(wide - lse[..., None]) - (vocab == labels[..., None])).astype(grad_dtype)
    return lse - picked, grad


def row_stats(logits_ref, label, block: int, eviction_policy: str | None = "evict_last"):
    """Inside a kernel: one pass over a row of logits (V,) in blocks of `block` -> (its logsumexp, the logit
    at `label`), fp32. The default eviction hint keeps the row in L2 for a second pass over it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    V = logits_ref.shape[0]

    def stats(i, carry):
        m, s, picked = carry
        index = i * block + jnp.arange(block)
        window = logits_ref.at[pl.ds(i * block, block)]
        x = plgpu.load(window, mask=index < V, other=-jnp.inf, eviction_policy=eviction_policy).astype(jnp.float32)
        m_new = jnp.maximum(m, jnp.max(x))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new))
        picked = picked + jnp.sum(jnp.where(index == label, x, 0.0))
        return m_new, s, picked

    zero = jnp.zeros((), jnp.float32)
    # the first block holds at least one real logit, so m is finite after it and exp(m - m_new) never nan
    init = (jnp.full((), -jnp.inf, jnp.float32), zero, zero)
    m, s, picked = jax.lax.fori_loop(0, pl.cdiv(V, block), stats, init)
    return m + jnp.log(s), picked


def _kernel(logits_ref, label_ref, loss_ref, grad_ref, *, block: int):
    """One row: logits_ref (V,), label_ref (1,) -> loss_ref (1,) fp32, grad_ref (V,)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    V = logits_ref.shape[0]
    label = label_ref[0]
    steps = pl.cdiv(V, block)
    lse, picked = row_stats(logits_ref, label, block)
    loss_ref[0] = lse - picked

    def write(i, carry):
        index = i * block + jnp.arange(block)
        mask = index < V
        window = pl.ds(i * block, block)
        x = plgpu.load(logits_ref.at[window], mask=mask, other=0.0, eviction_policy="evict_first")
        g = jnp.exp(x.astype(jnp.float32) - lse) - (index == label).astype(jnp.float32)
        plgpu.store(grad_ref.at[window], g.astype(grad_ref.dtype), mask=mask)
        return carry

    jax.lax.fori_loop(0, steps, write, 0)


def _pallas_rows(
    logits, labels, grad_dtype, interpret: bool = False, block: int = BLOCK, warps: int | None = None, stages: int = 1
):
    """The kernel over rows: logits (R, V), labels (R,) -> loss (R,), grad (R, V). `warps` None: NUM_WARPS for
    the logits' dtype; `stages`: Triton's software pipelining of the loops' loads (measured no faster)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, V = logits.shape
    block = min(block, pl.next_power_of_2(V))
    warps = warps or NUM_WARPS.get(logits.dtype.itemsize, 8)
    call = pl.pallas_call(
        functools.partial(_kernel, block=block),
        grid=(R,),
        in_specs=[pl.BlockSpec((None, V), lambda i: (i, 0)), pl.BlockSpec((None, 1), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((None, 1), lambda i: (i, 0)), pl.BlockSpec((None, V), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((R, 1), jnp.float32), jax.ShapeDtypeStruct((R, V), grad_dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="dsjax_softmax_xent",
    )
    loss, grad = call(logits, labels.astype(jnp.int32).reshape(R, 1))
    return loss[:, 0], grad


def _pallas(logits: jax.Array, labels: jax.Array, grad_dtype, interpret: bool = False):
    lead = labels.shape
    loss, grad = _pallas_rows(as_rows(logits), labels.reshape(-1), grad_dtype, interpret)
    return loss.reshape(lead), grad.reshape(logits.shape)


def resolve(impl: str, sharding: NamedSharding | None = None) -> str:
    """'auto' -> 'pallas' on GPUs when the logits' vocabulary axis is not split over devices, else 'xla'.
    An explicit 'pallas' with a split vocabulary is a ConfigError (the kernel needs whole rows)."""
    if impl not in LOSS_KERNELS:
        raise ConfigError(f"model.loss_kernel must be one of {LOSS_KERNELS}, got {impl!r}.")
    if impl == "auto":
        return "pallas" if sharding_platform(sharding) == "gpu" and not splits_last_axis(sharding) else "xla"
    if impl == "pallas" and splits_last_axis(sharding):
        raise ConfigError(
            f"model.loss_kernel='pallas' needs whole vocabulary rows on each device, but the logits are split "
            f"as {tuple(sharding.spec)} (tensor parallelism splits the vocabulary); use model.loss_kernel=auto."
        )
    return impl


def loss_and_unit_grad(
    logits: jax.Array, labels: jax.Array, grad_dtype, impl: str = "auto", sharding: NamedSharding | None = None
) -> tuple[jax.Array, jax.Array]:
    """logits (B, T, V), labels (B, T) -> (loss (B, T) fp32, softmax - onehot (B, T, V) in grad_dtype).

    `sharding` is the logits' sharding (None on one device). 'pallas' runs the kernel on each device's rows
    under `jax.shard_map`; on CPUs it runs in Pallas's interpreter (slow: for tests)."""
    if resolve(impl, sharding) == "xla":
        return _xla(logits, labels, grad_dtype)
    run = functools.partial(_pallas, grad_dtype=grad_dtype, interpret=sharding_platform(sharding) != "gpu")
    if sharding is None or sharding.mesh.size == 1:
        return run(logits, labels)
    # On a mesh, always under shard_map, also with replicated logits: under a vmap over the pipeline stages
    # (the 1F1B loop's LM head) shard_map splits the stage axis, where a bare kernel call would be gathered.
    spec = activation_spec(sharding)
    rows = P(spec[0], spec[1])
    mapped = jax.shard_map(
        run, mesh=sharding.mesh, in_specs=(P(*spec), rows), out_specs=(rows, P(*spec)), check_vma=False
    )
    return mapped(logits, labels)
