"""q, k and v out of gpt2's fused projection: `split_qkv(qkv, b)` adds the stacked bias and splits them apart.

gpt2's q, k and v come from one GEMM into (B, T, 3, N, H) (`gpt2.qkv_projections`); cuDNN's attention takes
three separate (B, T, N, H) arrays. The forward pass (bias add and split) is one XLA fusion that runs at the
memory's speed. Its backward pass gathers dq, dk and dv into one (B, T, 3, N, H) gradient for the GEMM's two
backward GEMMs and sums it over the rows for the bias gradient. Two implementations of that backward pass:

- 'xla': autodiff. XLA fuses the gather and the column sums into one fusion, which on gpt2-124m moved its
  bytes at about 2.5 TB/s on an H200 (1.47 ms per step at batch 32; experiments/RESULTS.md).
- 'pallas': one Pallas (Triton) kernel: each program copies row tiles of dq, dk and dv into their places and
  keeps the bias gradient as per-program partial column sums in fp32, added up outside. Under a mesh it runs
  per device under `jax.shard_map` (rows split, heads whole or split: each column is independent), the
  bias gradient summed over the devices that split the rows.

The forward pass is XLA's in both. Both compute the same values; the bias gradient's sums run in another order
(fp32 partial sums here, XLA's own order there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.config import QKV_KERNELS, ConfigError
from dsjax.models import layers
from dsjax.models.layers import as_rows, row_axes, row_tiles_with_column_sums, sharding_platform
from dsjax.sharding import named

# Row tiles of BLOCK_ROWS x BLOCK_COLS per loop step; ROW_PROGRAMS programs per column block, each looping
# over every ROW_PROGRAMS-th row tile (as dsjax.models.gelu's backward kernel, whose settings measured fastest).
BLOCK_ROWS = 16
BLOCK_COLS = 256
WARPS = 4
ROW_PROGRAMS = 128

HEADS = ("act_batch", "act_seq", "act_heads", None)


def _split(qkv: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    qkv = qkv + b
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _kernel(dq_ref, dk_ref, dv_ref, out_ref, db_ref, *, R, C, programs):
    """dq, dk, dv (R, C) -> out (R, 3 C) = [dq | dk | dv] row by row, db (programs, 3 C) partial column sums."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    pid, col_block = pl.program_id(0), pl.program_id(1)
    cols = col_block * BLOCK_COLS + jnp.arange(BLOCK_COLS)
    cmask = cols < C
    refs = (dq_ref, dk_ref, dv_ref)

    def body(k, sums):
        row_block = pid + k * programs
        rows = row_block * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
        mask = (rows < R)[:, None] & cmask[None, :]
        window = pl.ds(row_block * BLOCK_ROWS, BLOCK_ROWS)
        columns = pl.ds(col_block * BLOCK_COLS, BLOCK_COLS)
        tiles = [plgpu.load(ref.at[window, columns], mask=mask, other=0.0) for ref in refs]
        for s, tile in enumerate(tiles):
            plgpu.store(out_ref.at[window, pl.ds(s * C + col_block * BLOCK_COLS, BLOCK_COLS)], tile, mask=mask)
        return tuple(acc + jnp.sum(tile.astype(jnp.float32), axis=0) for acc, tile in zip(sums, tiles, strict=True))

    blocks = pl.cdiv(R, BLOCK_ROWS)
    zeros = jnp.zeros((BLOCK_COLS,), jnp.float32)
    sums = jax.lax.fori_loop(0, pl.cdiv(blocks - pid, programs), body, (zeros,) * 3)
    for s, acc in enumerate(sums):
        plgpu.store(db_ref.at[pid, pl.ds(s * C + col_block * BLOCK_COLS, BLOCK_COLS)], acc, mask=cmask)


def _pallas_bwd(dq, dk, dv, interpret: bool):
    """dq, dk, dv (R, C) -> (their rows side by side (R, 3 C), the column sums (3 C,) fp32)."""
    R, C = dq.shape
    return row_tiles_with_column_sums(
        functools.partial(_kernel, R=R, C=C), (dq, dk, dv), jax.ShapeDtypeStruct((R, 3 * C), dq.dtype), 3 * C,
        block_rows=BLOCK_ROWS, block_cols=BLOCK_COLS, max_programs=ROW_PROGRAMS, warps=WARPS, name="dsjax_qkv_bwd",
        interpret=interpret,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused(qkv, b, mapped, interpret):
    return _split(qkv, b)


def _fused_fwd(qkv, b, mapped, interpret):
    return _split(qkv, b), None


def _fused_bwd(mapped, interpret, residuals, cotangents):
    del residuals
    dq, dk, dv = cotangents

    def local(dq, dk, dv):
        B, T, N, H = dq.shape
        out, db = _pallas_bwd(as_rows(dq.reshape(B, T, N * H)), as_rows(dk.reshape(B, T, N * H)),
                              as_rows(dv.reshape(B, T, N * H)), interpret)  # fmt: skip
        return out.reshape(B, T, 3, N, H), db.reshape(3, N, H)

    dqkv, db = (local if mapped is None else mapped(local))(dq, dk, dv)
    return dqkv, db.astype(dq.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _mapper(sharding: NamedSharding):
    """The shard_map of the per-device backward function for (B, T, N, H) cotangents split as `sharding`:
    the gradient (B, T, 3, N, H) follows them, the bias gradient (3, N, H) the heads' split, summed over the
    axes that split the rows."""
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    act = P(*spec)
    out, bias = P(spec[0], spec[1], None, spec[2], None), P(None, spec[2], None)
    axes = row_axes(spec)

    def make(fn):
        def run(dq, dk, dv):
            dqkv, db = fn(dq, dk, dv)
            return dqkv, (jax.lax.psum(db, axes) if axes else db)

        return jax.shard_map(run, mesh=sharding.mesh, in_specs=(act, act, act), out_specs=(out, bias), check_vma=False)

    return make


def resolve(impl: str, sharding: NamedSharding | None = None) -> str:
    """'auto' -> 'pallas' on GPUs, 'xla' elsewhere and where jax lacks Pallas's Triton backend."""
    if impl not in QKV_KERNELS:
        raise ConfigError(f"model.qkv_kernel must be one of {QKV_KERNELS}, got {impl!r}.")
    if impl == "auto":
        return "pallas" if sharding_platform(sharding) == "gpu" and layers.triton_available() else "xla"
    if impl == "pallas":
        layers.check_triton("qkv_kernel")
    return impl


def split_qkv(
    qkv: jax.Array, b: jax.Array, *, impl: str = "xla", mesh: jax.sharding.Mesh | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv (B, T, 3, N, H) + b (3, N, H) -> q, k, v (B, T, N, H) in qkv's dtype. `mesh` lays q, k and v out
    as ("act_batch", "act_seq", "act_heads", None) (None on one device); `impl` is model.qkv_kernel."""
    B, T, _, N, H = qkv.shape
    sharding = None if mesh is None else named(HEADS, (B, T, N, H), mesh)
    b = b.astype(qkv.dtype)
    if resolve(impl, sharding) == "xla":
        return _split(qkv, b)
    mapped = None if sharding is None or sharding.mesh.size == 1 else _mapper(sharding)
    return _fused(qkv, b, mapped, sharding_platform(sharding) != "gpu")
