"""Prototype and micro-benchmark: GPT-2's MLP GELU inside Mosaic GPU GEMM epilogues, against cuBLAS + the GELU kernels.

Usage (Hopper GPU): PYTHONPATH=. python experiments/bench_mlp_kernel.py [--rows=32768 --d=768 --f=3072]
    [--dtype=bfloat16] [--settings=STAGES:GROUP,...] [--reps=5]

Times, on random activations and GPT-2-scaled weights:
  forward:  XLA's GEMM u = h @ W1, then the Pallas bias + GELU kernel (what `model.gelu_kernel=pallas` runs)
            against one Mosaic GEMM writing z = h @ W1 + b1 and gelu(z);
  backward: XLA's GEMM dg = dy @ W2^T, then the Pallas GELU backward kernel (du and b1's gradient)
            against one Mosaic GEMM writing dz = dg * gelu'(z) and b1's gradient,
each as the median of --reps runs of 20 back-to-back calls (one block per run), at each STAGES:GROUP setting
of the Mosaic kernels, and checks them against the unfused path. One JSON line per variant.

The kernels (tried in the thirteenth session, not adopted; experiments/RESULTS.md): a persistent
warp-specialized GEMM (one CUDA block per SM walking the output tiles; two compute warpgroups, each a
TILE_M x TILE_N WGMMA tile in fp32; one memory warpgroup streaming K slices by TMA) whose epilogue either
adds b1 and writes z and gelu(z) (forward), or multiplies dg = dy @ W2^T by gelu'(z), reading z's tile, and
writes dz with its column sums (backward). On an H200 they were no faster than cuBLAS plus the separate GELU
passes: with K = 768 the epilogue's arithmetic takes about as long as a tile's WGMMAs and is not overlapped
with them. The column sums (b1's gradient) came out wrong on the GPU (right in the interpreter); that was
not looked into.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp
from back_to_back import us_per_call
from jax import lax

from dsjax.models import gelu

C = math.sqrt(2.0 / math.pi)
A = 0.044715

TILE_M = 128  # rows of one compute warpgroup's tile; a block's two warpgroups take 2 * TILE_M rows
TILE_N = 128
TILE_K = 64  # 128 bytes of 16-bit values: one 128-byte swizzle row
STAGES = 3  # K slices in flight; 3 x 48 KiB of operands next to the 64 KiB epilogue buffer
GROUP = 8  # row tiles walked together


def _gelu(z):
    t = jnp.tanh(C * (z + A * z * z * z))
    return 0.5 * z * (1.0 + t)


def _gelu_grad(z):
    z2 = z * z
    t = jnp.tanh(C * z * (1.0 + A * z2))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * C * (1.0 + 3.0 * A * z2)


def _group(m_tiles: int) -> int:
    return next(g for g in (GROUP, 4, 2, 1) if m_tiles % g == 0)


def _walk(lin, m_tiles: int, n_tiles: int):
    """Tile `lin` of the persistent walk -> (row tile, column tile): down a band of `_group` row tiles, then
    to the band's next column."""
    group = _group(m_tiles)
    per_band = group * n_tiles
    band, r = lin // per_band, lin % per_band
    return band * group + r % group, r // group


def check_shapes(m: int, k: int, n: int) -> str | None:
    """Why an (m, k) x (k, n) product cannot run in these kernels, or None."""
    if m % (2 * TILE_M):
        return f"the rows (batch x sequence per device, {m}) are not a multiple of {2 * TILE_M}"
    if k % TILE_K:
        return f"the GEMM's inner dimension ({k}) is not a multiple of {TILE_K}"
    if n % TILE_N:
        return f"the hidden features per device ({n}) are not a multiple of {TILE_N}"
    return None


def _kernel(*refs, epilogue: str, transposed: bool, m_tiles: int, n_tiles: int, k_steps: int):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if epilogue == "bias_gelu":
        x_gmem, w_gmem, b_gmem, z_gmem, g_gmem = refs
    else:
        x_gmem, w_gmem, z_gmem, dz_gmem, sums_gmem = refs
    dtype = x_gmem.dtype
    transforms = (plgpu.TilingTransform((8, TILE_K)), plgpu.SwizzleTransform(128))
    w_block = (TILE_N, TILE_K) if transposed else (TILE_K, TILE_N)
    specs = [
        plgpu.BlockSpec((2 * TILE_M, TILE_K), lambda k: (0, k), transforms=transforms, memory_space=plgpu.SMEM),
        plgpu.BlockSpec(w_block, (lambda k: (0, k)) if transposed else (lambda k: (k, 0)), transforms=transforms,
                        memory_space=plgpu.SMEM),
    ]  # fmt: skip

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=STAGES, compute_context=context,
        )  # fmt: skip

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
        tile=plgpu.SMEM((2, TILE_M, TILE_N), dtype, transforms=transforms),
        vec=plgpu.SMEM((2, TILE_N), jnp.float32),
        arrived=plgpu.Barrier(num_barriers=2),
        collective_axes="wg",
    )
    def _scope(allocations, tile, vec, arrived):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _each_tile(info):
            (lin,) = info.index
            mi, ni = _walk(lin, m_tiles, n_tiles)
            block_rows = pl.ds(mi * 2 * TILE_M, 2 * TILE_M)
            rows = pl.ds(mi * 2 * TILE_M + wg * TILE_M, TILE_M)
            cols = pl.ds(ni * TILE_N, TILE_N)

            def context(run_pipeline):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have left `tile`, `vec`
                if epilogue == "bias_gelu":
                    plgpu.copy_gmem_to_smem(b_gmem.at[cols], vec.at[wg], arrived.at[wg])
                else:
                    plgpu.copy_gmem_to_smem(z_gmem.at[rows, cols], tile.at[wg], arrived.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TILE_M, TILE_N), jnp.float32))
                def _accumulate(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    plgpu.barrier_wait(arrived.at[wg])
                    if epilogue == "bias_gelu":
                        b = plgpu.load(vec.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                        z = (acc + lax.broadcast_in_dim(b, acc.shape, [1])).astype(dtype)
                        tile[wg] = z
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(tile.at[wg], z_gmem.at[rows, cols])
                        g = _gelu(z.astype(jnp.float32)).astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        tile[wg] = g
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(tile.at[wg], g_gmem.at[rows, cols])
                    else:
                        dz = acc * _gelu_grad(tile[wg].astype(jnp.float32))
                        tile[wg] = dz.astype(dtype)
                        vec[wg] = jnp.sum(dz, axis=0)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(tile.at[wg], dz_gmem.at[rows, cols])
                        plgpu.copy_smem_to_gmem(vec.at[wg], sums_gmem.at[2 * mi + wg, cols])

            def step(_, x_smem, w_smem, acc_ref):
                w = w_smem.transpose((1, 0)) if transposed else w_smem
                plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * TILE_M, TILE_M)], w)
                plgpu.wgmma_wait(0)
                return acc_ref

            w_cols = w_gmem.at[cols, :] if transposed else w_gmem.at[:, cols]
            pipeline(step, context)(x_gmem.at[block_rows, :], w_cols, allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _call(epilogue: str, x, w, extra, *, transposed: bool, interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    why = check_shapes(m, k, n)
    if why is not None:
        raise ValueError(f"these kernels cannot take this product: {why}")
    m_tiles, n_tiles = m // (2 * TILE_M), n // TILE_N
    if epilogue == "bias_gelu":
        out = (jax.ShapeDtypeStruct((m, n), x.dtype), jax.ShapeDtypeStruct((m, n), x.dtype))
    else:
        out = (jax.ShapeDtypeStruct((m, n), x.dtype), jax.ShapeDtypeStruct((2 * m_tiles, n), jnp.float32))
    sms = 2 if interpret is not None else jax.devices()[0].core_count
    kernel = plgpu.kernel(
        functools.partial(_kernel, epilogue=epilogue, transposed=transposed, m_tiles=m_tiles, n_tiles=n_tiles,
                          k_steps=k // TILE_K),
        out_type=out,
        grid=(min(sms, m_tiles * n_tiles),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=interpret is None, lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=interpret,
        kernel_name=f"dsjax_mlp_{epilogue}",
    )  # fmt: skip
    return kernel(x, w, extra)


def bias_gelu_gemm(x, w, b, interpret=None):
    """(z, gelu(z)) for z = x @ w + b, both in x's dtype. x (M, K), w (K, N), b (N,)."""
    return _call("bias_gelu", x, w, b.astype(jnp.float32), transposed=False, interpret=interpret)


def gelu_grad_gemm(dy, w, z, interpret=None):
    """(dz, column sums of dz in fp32) for dz = (dy @ w.T) * gelu'(z). dy (M, K), w (N, K), z (M, N)."""
    dz, sums = _call("gelu_grad", dy, w, z, transposed=True, interpret=interpret)
    return dz, sums.sum(axis=0)


def main() -> None:
    global STAGES, GROUP  # the kernels read them when traced
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=3072)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--settings", default="3:8,3:4,3:16,2:8")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    R, D, F, dt = args.rows, args.d, args.f, jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(k[0], (R, D), jnp.float32).astype(dt)
    w1 = (0.02 * jax.random.normal(k[1], (D, F), jnp.float32)).astype(dt)
    b1 = 0.1 * jax.random.normal(k[2], (F,), jnp.float32)
    w2 = (0.02 * jax.random.normal(k[3], (F, D), jnp.float32)).astype(dt)
    dy = (0.01 * jax.random.normal(k[4], (R, D), jnp.float32)).astype(dt)

    @jax.jit
    def fwd_unfused(h, w1, b1):
        u = h @ w1
        return u, gelu._pallas_fwd(u, b1.astype(dt), False)

    @jax.jit
    def bwd_unfused(dy, w2, u, b1):
        return gelu._pallas_bwd(u, b1.astype(dt), dy @ w2.T, False)

    u, g_ref = fwd_unfused(h, w1, b1)
    du_ref, db_ref = bwd_unfused(dy, w2, u, b1)
    z32 = h.astype(jnp.float32) @ w1.astype(jnp.float32) + b1
    base = {"rows": R, "d": D, "f": F, "dtype": args.dtype, "device": jax.devices()[0].device_kind}
    unfused = {
        "fwd_us": round(us_per_call(fwd_unfused, h, w1, b1, reps=args.reps), 1),
        "bwd_us": round(us_per_call(bwd_unfused, dy, w2, u, b1, reps=args.reps), 1),
        "gemm_alone_fwd_us": round(us_per_call(jax.jit(lambda h, w: h @ w), h, w1, reps=args.reps), 1),
        "gemm_alone_bwd_us": round(us_per_call(jax.jit(lambda d, w: d @ w.T), dy, w2, reps=args.reps), 1),
    }
    print(json.dumps({**base, "variant": "cuBLAS + Pallas GELU", **unfused}), flush=True)
    for setting in args.settings.split(","):
        stages, group = (int(s) for s in setting.split(":"))
        STAGES, GROUP = stages, group
        jax.clear_caches()  # the kernels read STAGES and GROUP when traced: trace them again
        fwd = jax.jit(bias_gelu_gemm)
        bwd = jax.jit(gelu_grad_gemm)
        try:
            z, g = fwd(h, w1, b1)
            dz, db = bwd(dy, w2, z)
            row = {
                "fwd_us": round(us_per_call(fwd, h, w1, b1, reps=args.reps), 1),
                "bwd_us": round(us_per_call(bwd, dy, w2, z, reps=args.reps), 1),
                "z_err": float(jnp.max(jnp.abs(z.astype(jnp.float32) - z32))),
                "g_vs_pallas": float(jnp.max(jnp.abs(g.astype(jnp.float32) - g_ref.astype(jnp.float32)))),
                "dz_vs_pallas": float(jnp.max(jnp.abs(dz.astype(jnp.float32) - du_ref.astype(jnp.float32)))),
                "dz_max": float(jnp.max(jnp.abs(du_ref.astype(jnp.float32)))),
                "db_vs_pallas": float(jnp.max(jnp.abs(db - db_ref))),
                "db_max": float(jnp.max(jnp.abs(db_ref))),
            }
        except Exception as e:  # a setting that does not fit shared memory
            row = {"error": str(e)[:300]}
        print(json.dumps({**base, "variant": f"Mosaic stages={stages} group={group}", **row}), flush=True)


if __name__ == "__main__":
    main()
