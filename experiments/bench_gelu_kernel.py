"""Micro-benchmark of GPT-2's bias + GELU (dsjax.models.gelu.bias_gelu): XLA against the Pallas kernels.

Usage (GPU): PYTHONPATH=. python experiments/bench_gelu_kernel.py [--reps=10]
    [--configs=BLOCK_ROWS:BLOCK_COLS:WARPS:BWD_ROW_PROGRAMS,...]

Shape: gpt2-124m's MLP at batch 32 (32 x 1024 x 3072, bf16). Times the forward pass alone and the forward
plus backward pass (the vjp applied to a random cotangent) for 'xla' and for the kernels at each setting:
the median of --reps runs of 20 back-to-back calls with one block per run. Also the error of each against
the exact GELU and its derivative computed in fp64 from the same bf16 inputs (relative L2 of the output, of
u's gradient and of b's gradient). One JSON line per variant, with GB/s over the fewest bytes (forward: u
read, the output written; backward: u and the cotangent read, u's gradient written).
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from bench_norm_kernel import timed  # experiments/ is on sys.path when run as a script

from dsjax.models import gelu


def exact(u, b, g):
    """fp64 gelu(u + b), du and db (numpy), z = u + b rounded to u's dtype as the block rounds it."""
    z = np.asarray((u + b).astype(u.dtype), np.float64)
    c, a = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(c * (z + a * z**3))
    out = 0.5 * z * (1 + t)
    dz = np.asarray(g, np.float64) * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * a * z * z))
    return out, dz, dz.reshape(-1, dz.shape[-1]).sum(0)


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,1024,3072")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--configs", default="16:256:4:128", help="BLOCK_ROWS:BLOCK_COLS:WARPS:BWD_ROW_PROGRAMS,...")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    ks = jax.random.split(jax.random.key(0), 3)
    u = (2 * jax.random.normal(ks[0], shape)).astype(jnp.bfloat16)
    b = (0.5 * jax.random.normal(ks[1], shape[-1:])).astype(jnp.bfloat16)
    g = jax.random.normal(ks[2], shape).astype(jnp.bfloat16)
    want = exact(u, b, g)
    n = math.prod(shape) * 2  # bytes of one bf16 tensor
    variants = [("xla", None)] + [("pallas", c) for c in args.configs.split(",")]
    for impl, config in variants:
        if config:
            gelu.BLOCK_ROWS, gelu.BLOCK_COLS, gelu.WARPS, gelu.BWD_ROW_PROGRAMS = map(int, config.split(":"))

        def fwd(u, b, impl=impl):
            return gelu.bias_gelu(u, b, impl=impl)

        def both(u, b, g, impl=impl):
            out, vjp = jax.vjp(fwd, u, b)
            return out, *vjp(g)

        fwd_j, both_j = jax.jit(fwd), jax.jit(both)
        got = both_j(u, b, g)
        fwd_ms = timed(fwd_j, u, b, reps=args.reps)
        both_ms = timed(both_j, u, b, g, reps=args.reps)
        row = {
            "impl": impl,
            "config": config,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "shape": shape,
            "fwd_ms": round(fwd_ms, 4),
            "fwd_bwd_ms": round(both_ms, 4),
            "bwd_ms": round(both_ms - fwd_ms, 4),
            "fwd_GBps": round(2 * n / fwd_ms / 1e6, 1),
            "bwd_GBps": round(3 * n / (both_ms - fwd_ms) / 1e6, 1),
            "rel_err_out": rel(got[0], want[0]),
            "rel_err_du": rel(got[1], want[1]),
            "rel_err_db": rel(got[2], want[2]),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
