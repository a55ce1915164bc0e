"""GPT-2-sized GEMMs in bf16 and fp16 through XLA: is fp16 slower on the same shapes, and on what data?

Usage: python experiments/bench_gemm_dtype.py [--reps=50] [--out=FILE]

Each (M, K, N) is one product of GPT-2 124M's training step at batch 32 x 1024 tokens (the q/k/v, output,
MLP and LM-head projections, forward and backward shapes). For each shape and dtype it times `--reps`
back-to-back calls of one jitted product x @ w (fp32 accumulation, output in the input dtype) with one
block at the end,
median of 5 such runs, on inputs drawn N(0, 1) and on inputs N(0, 0.02) (GPT-2's weight scale); prints one
JSON line per case with the TFLOP/s. The time is that of the whole jitted product, so it may include a
separate convert pass of the fp32 result (on the LM-head shape it is about 2.5 ms more than the GEMM alone
in XLA's autotune logs) and the products all take x and w untransposed; both dtypes are timed alike, and the
comparison between them is what the script is for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPES = (  # (M, K, N)
    (32768, 768, 2304),  # q/k/v forward
    (32768, 2304, 768),  # q/k/v input gradient
    (32768, 768, 768),  # attention output projection
    (32768, 768, 3072),  # MLP up
    (32768, 3072, 768),  # MLP down
    (768, 32768, 3072),  # MLP up weight gradient
    (32768, 768, 50304),  # LM head
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    @jax.jit
    def product(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    lines = []
    for m, k, n in SHAPES:
        for scale in (1.0, 0.02):
            for dtype in (jnp.bfloat16, jnp.float16):
                kx, kw = jax.random.split(jax.random.key(0))
                x = (scale * jax.random.normal(kx, (m, k), jnp.float32)).astype(dtype)
                w = (scale * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
                jax.block_until_ready(product(x, w))
                runs = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(args.reps):
                        out = product(x, w)
                    jax.block_until_ready(out)
                    runs.append((time.perf_counter() - start) / args.reps)
                t = statistics.median(runs)
                line = {
                    "m": m,
                    "k": k,
                    "n": n,
                    "scale": scale,
                    "dtype": jnp.dtype(dtype).name,
                    "us": round(1e6 * t, 1),
                    "tflops": round(2 * m * k * n / t / 1e12, 1),
                }
                print(json.dumps(line), flush=True)
                lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
