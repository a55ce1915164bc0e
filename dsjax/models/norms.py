"""LayerNorm and RMSNorm with the residual add before them: `add_norm`, in XLA or in Pallas kernels.

A pre-norm block runs `x = x + (y + b); h = norm(x)`: the residual add (with the bias of the projection
that made y, for GPT-2) and then the norm of the sum, which feeds the next matmul. `add_norm` returns
both (the new residual stream and the normalised activations). Two implementations of the same function:

- 'xla': jnp, differentiated by JAX. XLA fuses the passes as it likes; on GPT-2 small it lays the
  backward pass out as (T, D, B) fp32 transposes to reduce the scale and bias gradients over batch and
  time, several full passes over the activations per norm (experiments/RESULTS.md).
- 'pallas': one Pallas (Triton) kernel per direction, rows of the (rows, D) activations held whole in
  registers. Forward: read x and y, write the sum and the normalised rows, keep each row's mean and
  reciprocal standard deviation (fp32). Backward: read the two cotangents and the sum, write the one
  input cotangent, and accumulate the scale, bias (and projection-bias) gradients as per-program partial
  column sums, added up outside. Activations are split over devices by `jax.shard_map` along the rows;
  the feature axis must be whole on each device (it is under every layout dsjax has).

Statistics are fp32 in both; the sum and the output are rounded to the activations' dtype, the sum after
the bias add and again after the residual add, as the unfused block rounds them.
`impl='auto'` picks 'pallas' for LayerNorm on GPUs (widths up to MAX_PALLAS_WIDTH), 'xla' elsewhere and
for RMSNorm (not faster on llama-1b, and more memory: `resolve`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.config import NORM_KERNELS, ConfigError
from dsjax.models import layers
from dsjax.models.layers import activation_spec, as_rows, row_axes, sharding_platform, splits_last_axis
from dsjax.sharding import named

# Rows are held whole in registers: a row block is ROW_ELEMENTS elements (rows x the width padded to a
# power of two; one row where the width is larger), so widths up to MAX_PALLAS_WIDTH fit one program.
# Backward programs each loop over row blocks and keep their partial column sums in registers. The
# settings: the fastest of six on an H200 (experiments/bench_norm_kernel.py, experiments/RESULTS.md).
MAX_PALLAS_WIDTH = 8192
ROW_ELEMENTS = 4096
FWD_WARPS = 4
BWD_WARPS = 4
BWD_PROGRAMS = 1024


def _round(v: jax.Array, dtype) -> jax.Array:
    return v.astype(dtype).astype(jnp.float32)


def _sum_input(x, y, b):
    """x + (y + b) rounded as the unfused block rounds it; y or b may be None."""
    if y is None:
        return x
    if b is not None:
        y = y + b.astype(y.dtype)
    return x + y


def _normalise(s: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm (with `bias`) or RMSNorm (bias None) of s over its last axis, fp32 statistics, s.dtype out."""
    s32 = s.astype(jnp.float32)
    if bias is None:
        rstd = jax.lax.rsqrt(jnp.mean(jnp.square(s32), axis=-1, keepdims=True) + eps)
        return (s32 * rstd * scale.astype(jnp.float32)).astype(s.dtype)
    mean = jnp.mean(s32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(s32 - mean), axis=-1, keepdims=True)
    y = (s32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(s.dtype)


def _xla(x, y, b, scale, bias, eps):
    s = _sum_input(x, y, b)
    return s, _normalise(s, scale, bias, eps)


# ----------------------------------------------------------------------------------------------- kernels


def _geometry(R: int, D: int) -> tuple[int, int]:
    """(padded width, rows per block) for (R, D) activations."""
    from jax.experimental import pallas as pl

    DP = pl.next_power_of_2(D)
    rows = max(1, min(ROW_ELEMENTS // DP, pl.next_power_of_2(R)))
    return DP, rows


def _fwd_kernel(*refs, eps, rms, has_y, has_b, R, D, DP, BR):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    it = iter(refs)
    x_ref = next(it)
    y_ref = next(it) if has_y else None
    b_ref = next(it) if has_b else None
    scale_ref = next(it)
    bias_ref = None if rms else next(it)
    s_ref = next(it) if has_y else None
    h_ref, mean_ref, rstd_ref = next(it), next(it), next(it)

    row0 = pl.program_id(0) * BR
    rows = row0 + jnp.arange(BR)
    cols = jnp.arange(DP)
    rmask, cmask = rows < R, cols < D
    mask = rmask[:, None] & cmask[None, :]
    window = (pl.ds(row0, BR), pl.ds(0, DP))
    dtype = h_ref.dtype
    s = plgpu.load(x_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
    if has_y:
        t = plgpu.load(y_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
        if has_b:
            t = _round(t + plgpu.load(b_ref.at[pl.ds(0, DP)], mask=cmask, other=0.0).astype(jnp.float32)[None], dtype)
        s = _round(s + t, dtype)
        plgpu.store(s_ref.at[window], s.astype(dtype), mask=mask)
    scale = plgpu.load(scale_ref.at[pl.ds(0, DP)], mask=cmask, other=0.0).astype(jnp.float32)
    if rms:
        mean = jnp.zeros((BR,), jnp.float32)
        centred = s
    else:
        mean = jnp.sum(s, axis=1) / D
        centred = jnp.where(mask, s - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / D + eps)
    h = centred * rstd[:, None] * scale[None]
    if not rms:
        h = h + plgpu.load(bias_ref.at[pl.ds(0, DP)], mask=cmask, other=0.0).astype(jnp.float32)[None]
    plgpu.store(h_ref.at[window], h.astype(dtype), mask=mask)
    plgpu.store(mean_ref.at[pl.ds(row0, BR)], mean, mask=rmask)
    plgpu.store(rstd_ref.at[pl.ds(row0, BR)], rstd, mask=rmask)


def _bwd_kernel(*refs, rms, has_ds, has_b, R, D, DP, BR, programs):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    it = iter(refs)
    s_ref, mean_ref, rstd_ref, scale_ref, dh_ref = next(it), next(it), next(it), next(it), next(it)
    ds_ref = next(it) if has_ds else None
    dx_ref, dscale_ref = next(it), next(it)
    dbias_ref = None if rms else next(it)
    db_ref = next(it) if has_b else None

    pid = pl.program_id(0)
    cols = jnp.arange(DP)
    cmask = cols < D
    scale = plgpu.load(scale_ref.at[pl.ds(0, DP)], mask=cmask, other=0.0).astype(jnp.float32)
    blocks = pl.cdiv(R, BR)

    def body(k, acc):
        dscale, dbias, db = acc
        row0 = (pid + k * programs) * BR
        rows = row0 + jnp.arange(BR)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        window = (pl.ds(row0, BR), pl.ds(0, DP))
        s = plgpu.load(s_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
        dh = plgpu.load(dh_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
        rstd = plgpu.load(rstd_ref.at[pl.ds(row0, BR)], mask=rmask, other=0.0)
        if rms:
            xhat = s * rstd[:, None]
        else:
            mean = plgpu.load(mean_ref.at[pl.ds(row0, BR)], mask=rmask, other=0.0)
            xhat = jnp.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dh * scale[None]
        dx = g - xhat * (jnp.sum(g * xhat, axis=1) / D)[:, None]
        if not rms:
            dx = dx - (jnp.sum(g, axis=1) / D)[:, None]
        dx = dx * rstd[:, None]
        if has_ds:
            dx = dx + plgpu.load(ds_ref.at[window], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[window], dx.astype(dx_ref.dtype), mask=mask)
        dscale = dscale + jnp.sum(dh * xhat, axis=0)
        if not rms:
            dbias = dbias + jnp.sum(dh, axis=0)
        if has_b:
            db = db + jnp.sum(jnp.where(mask, dx, 0.0), axis=0)
        return dscale, dbias, db

    zero = jnp.zeros((DP,), jnp.float32)
    dscale, dbias, db = jax.lax.fori_loop(0, pl.cdiv(blocks - pid, programs), body, (zero, zero, zero))
    plgpu.store(dscale_ref.at[pid, pl.ds(0, DP)], dscale, mask=cmask)
    if not rms:
        plgpu.store(dbias_ref.at[pid, pl.ds(0, DP)], dbias, mask=cmask)
    if has_b:
        plgpu.store(db_ref.at[pid, pl.ds(0, DP)], db, mask=cmask)


def _pallas_fwd(x, y, b, scale, bias, eps, interpret):
    """Rows (R, D) -> (s or None, h, mean (R,), rstd (R,))."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, D = x.shape
    DP, BR = _geometry(R, D)
    rms = bias is None
    has_y, has_b = y is not None, b is not None
    inputs = [x] + ([y] if has_y else []) + ([b] if has_b else []) + [scale] + ([] if rms else [bias])
    rows = jax.ShapeDtypeStruct((R, D), x.dtype)
    stat = jax.ShapeDtypeStruct((R,), jnp.float32)
    shapes = ([rows] if has_y else []) + [rows, stat, stat]
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps, rms=rms, has_y=has_y, has_b=has_b, R=R, D=D, DP=DP, BR=BR),
        grid=(pl.cdiv(R, BR),),
        out_shape=shapes,
        compiler_params=plgpu.CompilerParams(num_warps=FWD_WARPS, num_stages=1),
        interpret=interpret,
        name="dsjax_add_norm_fwd" if has_y else "dsjax_norm_fwd",
    )(*inputs)
    return (None, *out) if not has_y else tuple(out)


def _pallas_bwd(s, mean, rstd, scale, dh, ds, rms, has_b, interpret):
    """-> (dx (R, D), dscale (D,), dbias (D,) or None, db (D,) or None), all gradients summed over rows."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, D = s.shape
    DP, BR = _geometry(R, D)
    programs = min(BWD_PROGRAMS, pl.cdiv(R, BR))
    has_ds = ds is not None
    partial = jax.ShapeDtypeStruct((programs, D), jnp.float32)
    shapes = [jax.ShapeDtypeStruct((R, D), dh.dtype), partial]
    shapes += ([] if rms else [partial]) + ([partial] if has_b else [])
    inputs = [s, mean, rstd, scale, dh] + ([ds] if has_ds else [])
    out = pl.pallas_call(
        functools.partial(_bwd_kernel, rms=rms, has_ds=has_ds, has_b=has_b, R=R, D=D, DP=DP, BR=BR, programs=programs),
        grid=(programs,),
        out_shape=shapes,
        compiler_params=plgpu.CompilerParams(num_warps=BWD_WARPS, num_stages=1),
        interpret=interpret,
        name="dsjax_norm_bwd",
    )(*inputs)
    dx, dscale, rest = out[0], out[1].sum(0), list(out[2:])
    dbias = None if rms else rest.pop(0).sum(0)
    db = rest.pop(0).sum(0) if has_b else None
    return dx, dscale, dbias, db


# ------------------------------------------------------------------------------------ differentiation


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, y, b, scale, bias, eps, mapped, interpret):
    """(s, h) with y given, h alone without: the plain norm's backward pass then reads no cotangent of s."""
    s, h, _, _ = _forward(x, y, b, scale, bias, eps, mapped, interpret)
    return h if y is None else (s, h)


def _forward(x, y, b, scale, bias, eps, mapped, interpret):
    """(s or None, h, mean, rstd) of the (..., D) inputs, per device under `mapped` (a shard_map maker)."""

    def local(x, y, b, scale, bias):
        lead = x.shape[:-1]
        s, h, mean, rstd = _pallas_fwd(as_rows(x), None if y is None else as_rows(y), b, scale, bias, eps, interpret)
        shape = lambda a: a.reshape(*lead, *a.shape[1:])  # noqa: E731
        return (None if s is None else shape(s)), shape(h), shape(mean), shape(rstd)

    run = local if mapped is None else mapped("fwd", local, y is not None)
    return run(x, y, b, scale, bias)


def _fused_fwd(x, y, b, scale, bias, eps, mapped, interpret):
    s, h, mean, rstd = _forward(x, y, b, scale, bias, eps, mapped, interpret)
    out = h if y is None else (s, h)
    # y itself is not needed: a zero-size stand-in records whether there was one
    marker = None if y is None else jnp.zeros((0,), y.dtype)
    return out, (x if s is None else s, mean, rstd, scale, b, bias, marker)


def _fused_bwd(eps, mapped, interpret, res, cts):
    s, mean, rstd, scale, b, bias, marker = res
    has_y, has_b, rms = marker is not None, b is not None, bias is None
    ds, dh = cts if has_y else (None, cts)

    def local(s, mean, rstd, scale, dh, ds):
        lead = s.shape[:-1]
        dx, dscale, dbias, db = _pallas_bwd(
            as_rows(s),
            mean.reshape(-1),
            rstd.reshape(-1),
            scale,
            as_rows(dh),
            None if ds is None else as_rows(ds),
            rms,
            has_b,
            interpret,
        )
        return dx.reshape(*lead, dx.shape[-1]), dscale, dbias, db

    run = local if mapped is None else mapped("bwd", local, rms, has_b, has_y)
    dx, dscale, dbias, db = run(s, mean, rstd, scale, dh, ds)
    dx = dx.astype(s.dtype)
    return (
        dx,
        dx if has_y else None,
        None if db is None else db.astype(b.dtype),
        dscale.astype(scale.dtype),
        None if dbias is None else dbias.astype(bias.dtype),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def _mapper(sharding: NamedSharding):
    """A maker of the shard_map of one direction's per-device function, for activations split as
    `sharding` (rows split over its batch/sequence axes, the feature axis whole)."""
    mesh = sharding.mesh
    spec = activation_spec(sharding)
    act, stat, vec = P(*spec), P(spec[0], spec[1]), P()
    axes = row_axes(spec)

    def make(direction, fn, *flags):
        if direction == "fwd":
            (has_y,) = flags

            def run(x, y, b, scale, bias):
                s, h, mean, rstd = fn(x, y, b, scale, bias)
                return (s, h, mean, rstd) if has_y else (h, mean, rstd)

            ins = (act, act if has_y else None, vec, vec, vec)
            outs = ((act,) if has_y else ()) + (act, stat, stat)
            mapped = jax.shard_map(run, mesh=mesh, in_specs=ins, out_specs=outs, check_vma=False)

            def call(x, y, b, scale, bias):
                out = mapped(x, y, b, scale, bias)
                return out if has_y else (None, *out)

            return call
        rms, has_b, has_ds = flags

        def run(s, mean, rstd, scale, dh, ds):
            dx, dscale, dbias, db = fn(s, mean, rstd, scale, dh, ds)
            # partial sums of this device's rows; the sum over devices is the psum below
            grads = [dscale] + ([] if rms else [dbias]) + ([db] if has_b else [])
            grads = [jax.lax.psum(g, axes) if axes else g for g in grads]
            return dx, *grads

        ins = (act, stat, stat, vec, act, act if has_ds else None)
        outs = (act,) + (vec,) * (1 + (not rms) + has_b)
        mapped = jax.shard_map(run, mesh=mesh, in_specs=ins, out_specs=outs, check_vma=False)

        def call(s, mean, rstd, scale, dh, ds):
            dx, *grads = mapped(s, mean, rstd, scale, dh, ds)
            dscale = grads.pop(0)
            dbias = None if rms else grads.pop(0)
            db = grads.pop(0) if has_b else None
            return dx, dscale, dbias, db

        return call

    return make


# ----------------------------------------------------------------------------------------------- public


def resolve(impl: str, width: int, sharding: NamedSharding | None = None, rms: bool = False) -> str:
    """'auto' -> 'pallas' for LayerNorm on GPUs (widths up to MAX_PALLAS_WIDTH, whole rows on each device),
    'xla' elsewhere and for RMSNorm: on llama-1b the kernels were no faster than XLA's fusions and the step
    took 2.1 GiB more (experiments/RESULTS.md); XLA too where jax lacks Pallas's Triton backend. An
    explicit 'pallas' that cannot run is a ConfigError."""
    if impl not in NORM_KERNELS:
        raise ConfigError(f"model.norm_kernel must be one of {NORM_KERNELS}, got {impl!r}.")
    fits = width <= MAX_PALLAS_WIDTH and not splits_last_axis(sharding)
    if impl == "auto":
        gpu = sharding_platform(sharding) == "gpu"
        return "pallas" if gpu and fits and not rms and layers.triton_available() else "xla"
    if impl == "pallas":
        layers.check_triton("norm_kernel")
    if impl == "pallas" and not fits:
        raise ConfigError(
            f"model.norm_kernel='pallas' holds whole rows of the activations in registers: it needs "
            f"model.d_model <= {MAX_PALLAS_WIDTH} (got {width}) and the feature axis unsplit (split as "
            f"{None if sharding is None else tuple(sharding.spec)}); use model.norm_kernel=auto or xla."
        )
    return impl


def add_norm(
    x: jax.Array,
    y: jax.Array | None,
    scale: jax.Array,
    bias: jax.Array | None,
    eps: float,
    *,
    y_bias: jax.Array | None = None,
    impl: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(s, norm(s)) with s = x + (y + y_bias) in x.dtype: LayerNorm with `bias`, RMSNorm with bias None.

    x, y: (B, T, D) activations (y None: s = x, a plain norm); scale, bias: (D,) (fp32 master values,
    used in fp32); y_bias: (D,), the bias of the projection that made y. `mesh` lays the activations out
    as ("act_batch", "act_seq", "act_embed") (None on one device); `impl` is model.norm_kernel ('pallas'
    runs Pallas's interpreter on CPUs: for tests).
    """
    if y_bias is not None and y is None:
        raise ValueError("add_norm: y_bias needs y")
    if y is not None and y.dtype != x.dtype:  # the kernels write s and the gradients in x's dtype
        raise ValueError(f"add_norm: y ({y.dtype}) must have x's dtype ({x.dtype})")
    sharding = None if mesh is None else named(("act_batch", "act_seq", "act_embed"), x.shape, mesh)
    if resolve(impl, x.shape[-1], sharding, rms=bias is None) == "xla":
        return _xla(x, y, y_bias, scale, bias, eps)
    mapped = None if sharding is None or sharding.mesh.size == 1 else _mapper(sharding)
    out = _fused(x, y, y_bias, scale, bias, eps, mapped, sharding_platform(sharding) != "gpu")
    return (x, out) if y is None else out
