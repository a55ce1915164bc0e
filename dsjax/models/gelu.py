"""GELU (tanh approximation) of a projection's output plus its bias: `bias_gelu`, in XLA or in Pallas kernels.

GPT-2's MLP runs gelu(u + b) on the (B, T, F) output u of its first GEMM. Two implementations:

- 'xla': jnp with a custom VJP that keeps u and b and computes the tanh again in the backward pass
  (autodiff would have the forward pass write the tanh of every element for the backward pass to read).
  XLA computes the tanh in fp32 with a rational approximation, many ALU operations per element: on
  gpt2-124m its GELU fusions run well under the memory's speed (experiments/RESULTS.md).
- 'pallas': one Pallas (Triton) kernel per direction with the GPU's own tanh instruction
  (`tanh.approx.f32`, relative error about 2^-11, below bf16's rounding), so each pass moves its bytes at
  the memory's speed. Forward: read u, write gelu(u + b). Backward: read u and the cotangent, write u's
  gradient and keep b's gradient as per-program partial column sums, added up outside. Under a mesh the
  kernels run per device under `jax.shard_map` (rows split, the feature axis whole or split: each column
  is independent).

u + b is rounded to u's dtype as the unfused block rounds it; the rest is fp32. The kernel's tanh is
approximate, so 'auto' takes it only for 16-bit activations on GPUs (fp32 runs keep XLA's exact tanh, which
the equivalence tests hold to 1e-5); on CPUs (tests) 'pallas' runs Pallas's interpreter with jnp.tanh.
Measured on an H200 against the fp64 GELU of random bf16 inputs, the kernels' results are closer than XLA's
bf16 fusion (relative L2 of u's gradient 1.6e-3 against 4.5e-3). Element by element, the instruction's error
bound allows more where GELU saturates, since its derivative takes 1 - tanh^2: up to 2e-3 absolute at
|u + b| = 3 and 1.3e-2 at 6 (from the bound, not measured element by element).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.config import GELU_KERNELS, ConfigError
from dsjax.models import layers
from dsjax.models.layers import (
    activation_spec,
    as_rows,
    recomputed,
    row_axes,
    row_tiles_with_column_sums,
    sharding_platform,
)
from dsjax.sharding import named

C = math.sqrt(2.0 / math.pi)
A = 0.044715

# Tile of the (rows, F) activations per program: BLOCK_ROWS x BLOCK_COLS elements. Backward programs each
# loop over row tiles of their column block, keeping b's partial column sums in registers. The settings:
# the fastest of seven on an H200 at gpt2-124m's shape (experiments/bench_gelu_kernel.py, RESULTS.md).
BLOCK_ROWS = 16
BLOCK_COLS = 256
WARPS = 4
BWD_ROW_PROGRAMS = 128


def gelu(z: jax.Array) -> jax.Array:
    return jax.nn.gelu(z, approximate=True)


# ------------------------------------------------------------------------------------------------- xla


def _bias_gelu(u: jax.Array, b: jax.Array) -> jax.Array:
    return gelu(u + b)


# gelu(u + b), its backward pass keeping only u and b (not the tanh autodiff would store) and computing the
# tanh again behind a barrier (without it XLA merged the two tanh computations and stored the forward
# pass's): on gpt2-124m B32 (one H200) the step went from 63.1 to 62.2 ms and its footprint from 22.5 to
# 20.3 GiB (experiments/RESULTS.md).
_xla = recomputed(_bias_gelu)


# ----------------------------------------------------------------------------------------------- kernels


def _tanh(y, exact: bool):
    from jax.experimental.pallas import triton as plgpu

    return jnp.tanh(y) if exact else plgpu.approx_tanh(y)


def _tile(R, F, row_block, col_block):
    from jax.experimental import pallas as pl

    rows = row_block * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + jnp.arange(BLOCK_COLS)
    cmask = cols < F
    mask = (rows < R)[:, None] & cmask[None, :]
    window = (pl.ds(row_block * BLOCK_ROWS, BLOCK_ROWS), pl.ds(col_block * BLOCK_COLS, BLOCK_COLS))
    return window, mask, cmask


def _preactivation(u_ref, b_ref, window, mask, cmask, col_block):
    """z = u + b, rounded to u's dtype, in fp32."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    u = plgpu.load(u_ref.at[window], mask=mask, other=0.0)
    b = plgpu.load(b_ref.at[pl.ds(col_block * BLOCK_COLS, BLOCK_COLS)], mask=cmask, other=0.0)
    return (u + b[None].astype(u.dtype)).astype(jnp.float32)


def _fwd_kernel(u_ref, b_ref, out_ref, *, R, F, exact):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    window, mask, cmask = _tile(R, F, pl.program_id(0), pl.program_id(1))
    z = _preactivation(u_ref, b_ref, window, mask, cmask, pl.program_id(1))
    t = _tanh(C * (z + A * z * z * z), exact)
    plgpu.store(out_ref.at[window], (0.5 * z * (1.0 + t)).astype(out_ref.dtype), mask=mask)


def _bwd_kernel(u_ref, b_ref, g_ref, du_ref, db_ref, *, R, F, exact, programs):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    pid, col_block = pl.program_id(0), pl.program_id(1)

    def body(k, db):
        window, mask, cmask = _tile(R, F, pid + k * programs, col_block)
        z = _preactivation(u_ref, b_ref, window, mask, cmask, col_block)
        g = plgpu.load(g_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
        z2 = z * z
        t = _tanh(C * z * (1.0 + A * z2), exact)
        dz = g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * C * (1.0 + 3.0 * A * z2))
        plgpu.store(du_ref.at[window], dz.astype(du_ref.dtype), mask=mask)
        return db + jnp.sum(jnp.where(mask, dz, 0.0), axis=0)

    blocks = pl.cdiv(R, BLOCK_ROWS)
    db = jax.lax.fori_loop(0, pl.cdiv(blocks - pid, programs), body, jnp.zeros((BLOCK_COLS,), jnp.float32))
    cols = col_block * BLOCK_COLS + jnp.arange(BLOCK_COLS)
    plgpu.store(db_ref.at[pid, pl.ds(col_block * BLOCK_COLS, BLOCK_COLS)], db, mask=cols < F)


def _pallas_fwd(u, b, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, F = u.shape
    return pl.pallas_call(
        functools.partial(_fwd_kernel, R=R, F=F, exact=interpret),
        grid=(pl.cdiv(R, BLOCK_ROWS), pl.cdiv(F, BLOCK_COLS)),
        out_shape=jax.ShapeDtypeStruct((R, F), u.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
        name="dsjax_bias_gelu_fwd",
    )(u, b)


def _pallas_bwd(u, b, g, interpret):
    """-> (du (R, F), db (F,) fp32 summed over rows)."""
    R, F = u.shape
    return row_tiles_with_column_sums(
        functools.partial(_bwd_kernel, R=R, F=F, exact=interpret), (u, b, g), jax.ShapeDtypeStruct((R, F), u.dtype), F,
        block_rows=BLOCK_ROWS, block_cols=BLOCK_COLS, max_programs=BWD_ROW_PROGRAMS, warps=WARPS,
        name="dsjax_bias_gelu_bwd", interpret=interpret,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused(u, b, mapped, interpret):
    return _run_fwd(u, b, mapped, interpret)


def _run_fwd(u, b, mapped, interpret):
    def local(u, b):
        return _pallas_fwd(as_rows(u), b, interpret).reshape(u.shape)

    return (local if mapped is None else mapped("fwd", local))(u, b)


def _fused_fwd(u, b, mapped, interpret):
    return _run_fwd(u, b, mapped, interpret), (u, b)


def _fused_bwd(mapped, interpret, residuals, g):
    u, b = residuals

    def local(u, b, g):
        du, db = _pallas_bwd(as_rows(u), b, as_rows(g), interpret)
        return du.reshape(u.shape), db

    du, db = (local if mapped is None else mapped("bwd", local))(u, b, g)
    return du, db.astype(b.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _mapper(sharding: NamedSharding):
    """A maker of the shard_map of one direction's per-device function, for (B, T, F) activations split
    as `sharding`; b follows the feature axis' split, its gradient is summed over the row axes."""
    mesh = sharding.mesh
    spec = activation_spec(sharding)
    act, vec = P(*spec), P(spec[2])
    axes = row_axes(spec)

    def make(direction, fn):
        if direction == "fwd":
            return jax.shard_map(fn, mesh=mesh, in_specs=(act, vec), out_specs=act, check_vma=False)

        def run(u, b, g):
            du, db = fn(u, b, g)
            return du, (jax.lax.psum(db, axes) if axes else db)

        return jax.shard_map(run, mesh=mesh, in_specs=(act, vec, act), out_specs=(act, vec), check_vma=False)

    return make


# ----------------------------------------------------------------------------------------------- public


def resolve(impl: str, dtype, sharding: NamedSharding | None = None) -> str:
    """'auto' -> 'pallas' for 16-bit activations on GPUs, 'xla' otherwise (fp32 keeps the exact tanh) and
    where jax lacks Pallas's Triton backend."""
    if impl not in GELU_KERNELS:
        raise ConfigError(f"model.gelu_kernel must be one of {GELU_KERNELS}, got {impl!r}.")
    if impl == "auto":
        gpu = sharding_platform(sharding) == "gpu"
        return "pallas" if gpu and jnp.dtype(dtype).itemsize == 2 and layers.triton_available() else "xla"
    if impl == "pallas":
        layers.check_triton("gelu_kernel")
    return impl


def bias_gelu(u: jax.Array, b: jax.Array, *, impl: str = "xla", mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """gelu(u + b) (tanh approximation) of u (B, T, F) and b (F,) in u's dtype. `mesh` lays u out as
    ("act_batch", "act_seq", "act_mlp") (None on one device); `impl` is model.gelu_kernel."""
    sharding = None if mesh is None else named(("act_batch", "act_seq", "act_mlp"), u.shape, mesh)
    b = b.astype(u.dtype)
    if resolve(impl, u.dtype, sharding) == "xla":
        return _xla(u, b)
    mapped = None if sharding is None or sharding.mesh.size == 1 else _mapper(sharding)
    return _fused(u, b, mapped, sharding_platform(sharding) != "gpu")
