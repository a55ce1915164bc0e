"""Micro-benchmark of the residual add + norm (dsjax.models.norms.add_norm): XLA against the Pallas kernels.

Usage (GPU): PYTHONPATH=. python experiments/bench_norm_kernel.py [--shapes=gpt2,llama] [--reps=20]
    [--configs=ROW_ELEMENTS:FWD_WARPS:BWD_WARPS:BWD_PROGRAMS,...]

Shapes: 'gpt2' is gpt2-124m's LayerNorm after the attention block at batch 32 (32768 rows of 768, bf16,
with the projection bias); 'llama' is llama-1b's RMSNorm at batch 8 (16384 rows of 2048, bf16, no bias).
For each, times the forward pass alone (s, h) and the forward plus backward pass (the vjp applied to
random cotangents of s and h), for 'xla' and for the kernels at each setting: the median of --reps runs of
20 back-to-back calls with one block per run. Checks the kernels against XLA in fp32. Prints one JSON line
per variant with ms and GB/s over the fewest bytes (forward: x and y read, s and h written; backward adds
two cotangents and s read, one gradient written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dsjax.models import norms

SHAPES = {"gpt2": (32768, 768, True), "llama": (16384, 2048, False)}  # rows, width, LayerNorm with biases


def timed(fn, *args, reps: int, calls: int = 20) -> float:
    """Median over `reps` of the time per call of `calls` back-to-back calls with one block at the end (so
    the launch of one call overlaps the previous one, as in a step)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)


def inputs(R, D, layer, dtype):
    ks = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(ks[0], (1, R, D)).astype(dtype)
    y = jax.random.normal(ks[1], (1, R, D)).astype(dtype)
    b = (0.1 * jax.random.normal(ks[2], (D,))).astype(dtype) if layer else None
    scale = 1 + 0.1 * jax.random.normal(ks[3], (D,))
    bias = 0.1 * jax.random.normal(ks[4], (D,)) if layer else None
    ds = jax.random.normal(ks[5], (1, R, D)).astype(dtype)
    dh = jax.random.normal(ks[6], (1, R, D)).astype(dtype)
    return x, y, b, scale, bias, ds, dh


def functions(impl):
    def fwd(x, y, b, scale, bias):
        return norms.add_norm(x, y, scale, bias, 1e-5, y_bias=b, impl=impl)

    def both(x, y, b, scale, bias, ds, dh):
        out, vjp = jax.vjp(fwd, x, y, b, scale, bias)
        return out, vjp((ds, dh))

    return jax.jit(fwd), jax.jit(both)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="gpt2,llama")
    parser.add_argument("--reps", type=int, default=20)
    configs = "8192:8:8:1024,4096:4:4:1024,4096:4:4:512,4096:4:8:2048,2048:4:4:1024,8192:4:8:1024"
    parser.add_argument("--configs", default=configs)
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        R, D, layer = SHAPES[shape]
        args16 = inputs(R, D, layer, jnp.bfloat16)
        unit = R * D * 2
        fwd_bytes, both_bytes = 4 * unit, 4 * unit + 4 * unit
        # correctness in fp32 on a slice of the rows
        args32 = [None if a is None else a.astype(jnp.float32) for a in inputs(4096, D, layer, jnp.float32)]
        ref = functions("xla")[1](*args32)
        variants = [("xla", None)] + [("pallas", c) for c in args.configs.split(",")]
        for impl, config in variants:
            if config:
                rows_el, fw, bw, programs = (int(v) for v in config.split(":"))
                norms.ROW_ELEMENTS, norms.FWD_WARPS, norms.BWD_WARPS, norms.BWD_PROGRAMS = rows_el, fw, bw, programs
            fwd, both = functions(impl)
            row = {"shape": shape, "rows": R, "width": D, "impl": impl, "config": config}
            row["fwd_ms"] = round(timed(fwd, *args16[:5], reps=args.reps), 3)
            row["fwd_bwd_ms"] = round(timed(both, *args16, reps=args.reps), 3)
            row["fwd_GBps"] = round(fwd_bytes / row["fwd_ms"] / 1e6, 1)
            row["fwd_bwd_GBps"] = round(both_bytes / row["fwd_bwd_ms"] / 1e6, 1)
            if impl == "pallas":
                got = functions(impl)[1](*args32)
                row["max_rel_diff_fp32"] = max(
                    float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30))
                    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
                )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
