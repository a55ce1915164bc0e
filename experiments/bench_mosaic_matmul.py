"""jax's example Hopper matmul in Mosaic GPU against XLA's GEMM (cuBLAS) on gpt2-124m's shapes.

Usage (Hopper GPU): PYTHONPATH=. python experiments/bench_mosaic_matmul.py

For three products of the gpt2-124m batch-32 step (the MLP's up and down projections and the fused q/k/v
projection; bf16 in and out), times XLA's `jnp.dot` and `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`
at 96 tunings (tile, pipeline depth, walk order, warpgroup split, cluster), and prints one JSON line per
shape and implementation (the example at its fastest tuning). It measures how far a Pallas Mosaic GPU GEMM
is from cuBLAS before any epilogue is fused into one (experiments/bench_mlp_kernel.py; RESULTS.md,
thirteenth session).
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
from back_to_back import us_per_call


def main() -> None:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    dims = hm.MatmulDimension
    for m, k, n, name in [(32768, 768, 3072, "up fwd"), (32768, 3072, 768, "down fwd"), (32768, 768, 2304, "qkv fwd")]:
        a = (0.5 * jax.random.normal(jax.random.key(0), (m, k), jnp.float32)).astype(jnp.bfloat16)
        b = (0.02 * jax.random.normal(jax.random.key(1), (k, n), jnp.float32)).astype(jnp.bfloat16)
        flops = 2 * m * n * k
        xla = jax.jit(jnp.dot)
        us = us_per_call(xla, a, b, calls=50, reps=5)
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n, "impl": "xla", "us": round(us, 1),
                          "tflops": round(flops / us / 1e6, 1)}), flush=True)  # fmt: skip
        want = xla(a, b).astype(jnp.float32)
        best = None
        walks = (dims.M, dims.N)
        tunings = itertools.product((128, 256), (4, 6), walks, (8, 16), (dims.N, dims.M), (None, dims.M, dims.N))
        for tile_n, steps, minor, width, wg, cluster in tunings:
            config = hm.TuningConfig(
                tile_m=128, tile_n=tile_n, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64, epi_tile_m=64,
                grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg, cluster_dimension=cluster,
            )  # fmt: skip
            fn = jax.jit(lambda a, b, config=config: hm.matmul(a, b, None, config))
            try:
                us = us_per_call(fn, a, b, calls=20, reps=3)
            except Exception:  # a tuning that does not fit shared memory or the shape
                continue
            err = float(jnp.max(jnp.abs(fn(a, b).astype(jnp.float32) - want)))
            if best is None or us < best[0]:
                best = (us, config, err)
        if best is None:
            print(json.dumps({"shape": name, "impl": "mosaic example", "error": "no tuning ran"}), flush=True)
            continue
        us, config, err = best
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n, "impl": "mosaic example", "us": round(us, 1),
                          "tflops": round(flops / us / 1e6, 1), "max_diff_vs_xla": err, "config": str(config)}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
