"""Softmax cross-entropy of LM-head logits: the loss and the gradient of each position's loss in one step.

`loss_and_unit_grad(logits, labels)` returns, per position, loss = logsumexp(logits) - logits[label] (fp32)
and the gradient of that loss with respect to the logits, softmax(logits) - onehot(label), written in the
compute dtype. The LM head's backward pass then needs only the gradient (scaled by each position's
cotangent after its GEMMs), not the logits: the fp32 logits die in the forward pass.

Three implementations of the same function:
- 'xla': jnp; XLA runs it as a reduction over the logits (max and sum of exponentials in one pass) and an
  elementwise pass that writes the gradient, each a full read of the logits from device memory.
- 'pallas': one Pallas (Triton) kernel, one program per row of logits: a loop over the row for the running
  max and sum of exponentials, then a second loop that writes the gradient. Same passes, less time than
  XLA's two kernels on an H200 (experiments/RESULTS.md). Rows are split over the devices by
  `jax.shard_map` along the logits' batch sharding; a vocabulary split over devices (tensor parallelism)
  keeps 'xla', whose reductions GSPMD partitions itself.
- 'mosaic': one Pallas Mosaic GPU kernel (Hopper and newer), one CUDA block per row: the row is copied once
  into shared memory, and the max, the sum of exponentials and the gradient are computed from there; the
  gradient overwrites the row in shared memory and is copied out. The logits are read from device memory
  once instead of twice (6.6 instead of 9.9 GB per step on gpt2-124m at batch 32). It needs the row in shared
  memory (V x itemsize <= MOSAIC_ROW_BYTES), V a multiple of 128 and the gradient in the logits' dtype.
`impl='auto'` picks 'mosaic' on Hopper GPUs where the row fits, else 'pallas' on GPUs when the vocabulary is
not split, 'xla' elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.config import LOSS_KERNELS, ConfigError
from dsjax.models import layers
from dsjax.models.layers import activation_spec, as_rows, sharding_platform, splits_last_axis

# logits of a row read per loop iteration (a power of two, as Triton needs) and warps per row, by the bytes of
# a logit: the fastest of 1024-8192 and 2-16 warps on an H200 (experiments/bench_loss_kernel.py,
# experiments/RESULTS.md). 16-bit logits take 4 warps (16 bytes per thread per load): 3.07 against 3.44 ms
# with 8 on gpt2-124m's (32768 x 50304) bf16 logits.
BLOCK = 2048
NUM_WARPS = {2: 4, 4: 8}

# The Mosaic kernel: logits per register chunk (8 per thread per 16-byte vector for 16-bit logits; on gpt2-124m's
# bf16 logits 1.90 ms against 2.06 ms for 4096 and 2.14 ms for 2048 in the prototype's call on one H200; a later
# call put 4096 and 8192 within its run-to-run spread, experiments/RESULTS.md), and the largest row it takes: a
# CUDA block has at most 227 KiB of shared memory on Hopper, less the kernel's small buffers.
MOSAIC_CHUNK = 8192
MOSAIC_ROW_BYTES = 220 * 1024
_LOG2E = 1.4426950408889634
# the label and the logsumexp travel per row in 128-byte rows (the smallest copy every supported jax takes)
_SIDE = 32


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


def _on_rows(rows_fn, logits: jax.Array, labels: jax.Array):
    """A kernel over rows, rows_fn(logits (R, V), labels (R,)) -> (loss (R,), grad (R, V)), applied to logits
    (..., V) and labels (...)."""
    loss, grad = rows_fn(as_rows(logits), labels.reshape(-1))
    return loss.reshape(labels.shape), grad.reshape(logits.shape)


def mosaic_problem(vocab: int, dtype, grad_dtype) -> str | None:
    """Why the Mosaic kernel cannot take rows of `vocab` logits of `dtype` with a `grad_dtype` gradient,
    or None when it can."""
    dtype, grad_dtype = jnp.dtype(dtype), jnp.dtype(grad_dtype)
    if dtype != grad_dtype:
        return f"it writes the gradient over the row, in the logits' dtype ({dtype.name}), not {grad_dtype.name}"
    if dtype.itemsize not in (2, 4):
        return f"it takes 16- or 32-bit logits, not {dtype.name}"
    if vocab % 128:
        return f"it needs the vocabulary to be a multiple of 128, got {vocab}"
    if vocab * dtype.itemsize > MOSAIC_ROW_BYTES:
        return (
            f"a row of {vocab} {dtype.name} logits is {vocab * dtype.itemsize} bytes, more than the "
            f"{MOSAIC_ROW_BYTES} bytes of shared memory it may take"
        )
    return None


def _load(ref, start: int, size: int, vec: int):
    """ref[start:start + size] into registers, `vec` consecutive elements per thread and load."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WG_STRIDED((size,), vec_size=vec)
    window = pl.ds(start, size)
    if _load_takes_index():  # jax < 0.11: load(ref, idx, layout=...)
        return plgpu.load(ref, window, layout=layout)
    return plgpu.load(ref.at[window], layout=layout)


@functools.cache
def _load_takes_index() -> bool:
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    idx = inspect.signature(plgpu.load).parameters.get("idx")
    return idx is not None and idx.default is inspect.Parameter.empty


def _mosaic_plan(V: int, vec: int, chunk: int) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """How the Mosaic kernel walks a row of V logits (V a multiple of 128) with `vec` per 16-byte load, in
    register chunks of at most `chunk` -> (the loop's chunk, its elements per load, the loop's count, the
    (start, size, elements per load) pieces after it). The loop's chunk is the largest power-of-two multiple
    of 128 no larger than `chunk` or V; the rest of the row, a multiple of 128 shorter than it, is cut into
    halving pieces (each a power-of-two multiple of 128)."""
    size = 128
    while size * 2 <= min(chunk, V):
        size *= 2
    n = V // size
    start, pieces, piece = n * size, [], size // 2
    while start < V:
        if V - start >= piece:
            pieces.append((start, piece, min(vec, piece // 128)))
            start += piece
        piece //= 2
    return size, min(vec, size // 128), n, pieces


def _mosaic_rows(logits, labels, interpret=None, chunk: int = MOSAIC_CHUNK):
    """The Mosaic kernel over rows: logits (R, V), labels (R,) -> loss (R,) fp32, softmax - onehot (R, V) in
    the logits' dtype. One CUDA block (one warpgroup, 128 threads) per row; two blocks fit an SM with
    16-bit rows of gpt2's vocabulary."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    R, V = logits.shape
    f32 = jnp.float32
    chunk, vec, n, tail = _mosaic_plan(V, 16 // logits.dtype.itemsize, chunk)  # 16-byte loads from shared memory
    fast = logits.dtype.itemsize == 2

    def exp_minus(x, c):
        """exp(x - c) of fp32 x and a scalar c. For 16-bit logits 2^(x log2 e - c log2 e): one FMA and the GPU's
        approximate exp2 (their gradient is rounded to 8 or 11 bits anyway); fp32 logits take the exact exp of
        the exact difference, which the fp32 equivalence tests hold to 1e-5 as they hold the other kernels."""
        return jnp.exp2(x * _LOG2E - c * _LOG2E) if fast else jnp.exp(x - c)

    side = jnp.pad(labels.astype(jnp.int32)[:, None], ((0, 0), (0, _SIDE - 1)))

    def body(x_gmem, label_gmem, lse_gmem, grad_gmem, row, label_smem, lse_smem, barriers):
        r = jax.lax.axis_index("rows")
        in_bounds = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
        plgpu.copy_gmem_to_smem(x_gmem.at[r], row, barriers.at[0], oob_mode=in_bounds)
        plgpu.copy_gmem_to_smem(label_gmem.at[r], label_smem, barriers.at[1], oob_mode=in_bounds)
        plgpu.barrier_wait(barriers.at[0])

        def fold(op, reduce, f, init, dtype):
            """reduce(op-fold of f(piece) over the row): per-lane over the loop's chunks, then per piece."""
            lanes = plgpu.layout_cast(jnp.full((chunk,), init, dtype), plgpu.Layout.WG_STRIDED((chunk,), vec_size=vec))
            acc = jax.lax.fori_loop(0, n, lambda i, a: op(a, f(i * chunk, chunk, vec)), lanes)
            total = reduce(acc).astype(f32)
            for piece in tail:
                total = op(total, reduce(f(*piece)).astype(f32))
            return total

        # the max in the logits' dtype (exact; bf16x2 max instructions), then the sum of exp(x - max)
        m = fold(jnp.maximum, jnp.max, functools.partial(_load, row), -jnp.inf, row.dtype)

        def exp(start, size, v):
            return exp_minus(_load(row, start, size, v).astype(f32), m)

        plgpu.barrier_wait(barriers.at[1])
        label = label_smem[0]
        # the label's logit, read before the gradient overwrites it (0 for a label outside the row); the
        # reductions of the sum below synchronise the warpgroup before any thread writes the gradient
        picked = jnp.where((label >= 0) & (label < V), row[jnp.clip(label, 0, V - 1)].astype(f32), 0.0)
        s = fold(jnp.add, jnp.sum, exp, 0.0, f32)
        lse = m + jnp.log(s)

        def write(start, size, v):
            x = _load(row, start, size, v).astype(f32)
            p = exp_minus(x, lse)
            index = plgpu.broadcasted_iota(jnp.int32, (size,), 0, layout=plgpu.Layout.WG_STRIDED((size,), vec_size=v))
            row[pl.ds(start, size)] = (p - (index + start == label).astype(f32)).astype(row.dtype)

        @pl.loop(0, n)
        def _(i):
            write(i * chunk, chunk, vec)

        for piece in tail:
            write(*piece)
        lse_smem[pl.ds(0, 1)] = jnp.full((1,), lse - picked, f32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(row, grad_gmem.at[r])
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[r])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((R, _SIDE), f32), jax.ShapeDtypeStruct((R, V), logits.dtype)),
        scratch_types=[
            plgpu.SMEM((V,), logits.dtype),
            plgpu.SMEM((_SIDE,), jnp.int32),
            plgpu.SMEM((_SIDE,), f32),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(R,),
        grid_names=("rows",),
        compiler_params=plgpu.CompilerParams(approx_math=fast),
        interpret=interpret,
        kernel_name="dsjax_softmax_xent_mosaic",
    )
    loss, grad = call(logits, side)
    return loss[:, 0], grad


def _device(sharding: NamedSharding | None):
    """A device of `sharding` (the default one without it)."""
    return next(iter(sharding.mesh.devices.flat)) if sharding is not None else jax.devices()[0]


def hopper_or_newer(sharding: NamedSharding | None = None) -> bool:
    """Whether the devices (those of `sharding`, else the default ones) are NVIDIA GPUs of compute capability
    9.0 or newer, which the Mosaic kernel needs (bulk copies into shared memory)."""
    device = _device(sharding)
    try:
        return device.platform == "gpu" and float(device.compute_capability) >= 9.0
    except (AttributeError, TypeError, ValueError):  # not CUDA: ROCm GPUs, CPUs
        return False


def resolve(
    impl: str, sharding: NamedSharding | None = None, vocab: int | None = None, dtype=None, grad_dtype=None
) -> str:
    """'auto' -> 'mosaic' on Hopper GPUs when the row fits it (`vocab`, `dtype` and `grad_dtype` given),
    else 'pallas' on GPUs when the logits' vocabulary axis is not split over devices and jax has Pallas's
    Triton backend, else 'xla'.
    An explicit kernel that cannot take the logits is a ConfigError that says why."""
    if impl not in LOSS_KERNELS:
        raise ConfigError(f"model.loss_kernel must be one of {LOSS_KERNELS}, got {impl!r}.")
    on_gpu = sharding_platform(sharding) == "gpu"
    problem = None if vocab is None else mosaic_problem(vocab, dtype, grad_dtype)
    if impl == "auto":
        if not on_gpu or splits_last_axis(sharding):
            return "xla"
        if vocab is not None and problem is None and hopper_or_newer(sharding):
            return "mosaic"
        return "pallas" if layers.triton_available() else "xla"
    if impl in ("pallas", "mosaic") and splits_last_axis(sharding):
        raise ConfigError(
            f"model.loss_kernel={impl!r} needs whole vocabulary rows on each device, but the logits are split "
            f"as {tuple(sharding.spec)} (tensor parallelism splits the vocabulary); use model.loss_kernel=auto."
        )
    if impl == "pallas":
        layers.check_triton("loss_kernel")
    if impl == "mosaic":
        if problem is not None:
            raise ConfigError(f"model.loss_kernel='mosaic' cannot take these logits: {problem}; use 'auto'.")
        if on_gpu and not hopper_or_newer(sharding):
            device = _device(sharding)
            raise ConfigError(
                "model.loss_kernel='mosaic' needs an NVIDIA GPU of compute capability 9.0 or newer (Hopper), "
                f"got {device.device_kind} (compute capability {getattr(device, 'compute_capability', 'none')}); "
                "use model.loss_kernel=auto, which takes the Triton kernel (or XLA) on older GPUs."
            )
        if not on_gpu and not mosaic_interpretable():
            raise ConfigError(
                f"model.loss_kernel='mosaic' runs off GPUs only in Mosaic GPU's interpreter, which jax "
                f"{jax.__version__} lacks (it came with jax 0.11); use model.loss_kernel=auto."
            )
    return impl


def mosaic_interpretable() -> bool:
    """Whether this jax can run Mosaic GPU kernels on CPUs (its GPU interpreter: for tests)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return hasattr(plgpu, "InterpretGPUParams")


def loss_and_unit_grad(
    logits: jax.Array, labels: jax.Array, grad_dtype, impl: str = "auto", sharding: NamedSharding | None = None
) -> tuple[jax.Array, jax.Array]:
    """logits (B, T, V), labels (B, T) -> (loss (B, T) fp32, softmax - onehot (B, T, V) in grad_dtype).

    `sharding` is the logits' sharding (None on one device). The kernels run on each device's rows under
    `jax.shard_map`; on CPUs they run in Pallas's interpreters (slow: for tests)."""
    impl = resolve(impl, sharding, logits.shape[-1], logits.dtype, grad_dtype)
    if impl == "xla":
        return _xla(logits, labels, grad_dtype)
    off_gpu = sharding_platform(sharding) != "gpu"
    if impl == "mosaic":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        rows_fn = functools.partial(_mosaic_rows, interpret=plgpu.InterpretGPUParams() if off_gpu else None)
    else:
        rows_fn = functools.partial(_pallas_rows, grad_dtype=grad_dtype, interpret=off_gpu)
    run = functools.partial(_on_rows, rows_fn)
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
