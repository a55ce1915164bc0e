"""Micro-benchmark: GPT-2's MLP (fc GEMM, bias, GELU, proj GEMM), and whether XLA folds bias + GELU into the GEMM.

Usage (one GPU): PYTHONPATH=. python experiments/bench_mlp_epilogue.py [--tokens=32768]
Run it once per XLA_FLAGS setting (XLA reads them at start), e.g. with and without
`--xla_gpu_enable_cublaslt=true`, under which XLA's GEMM rewriter may give cuBLASLt the bias and the GELU as
the GEMM's epilogue (and the pre-activation as an auxiliary output for the backward pass).

Shapes: gpt2-124m at batch 32 x 1024 (D 768, F 3072), bf16. Variants of GELU(x @ w_fc + b_fc):
- `dsjax`: `dsjax.models.gelu.bias_gelu` with impl="xla" (custom VJP: keeps the GEMM output u and b, tanh recomputed);
- `autodiff`: jax.nn.gelu(u + b, approximate=True), differentiated automatically;
- `preact`: a custom VJP that keeps z = u + b, the form an epilogue with an auxiliary output writes.
For each: the forward pass alone and forward + backward (gradients of x, both weights and the bias), the
median of `--reps` timed calls, and the epilogues of the cuBLAS calls in the optimized HLO. One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp

from dsjax.models.gelu import bias_gelu


def gelu(z):
    return jax.nn.gelu(z, approximate=True)


@jax.custom_vjp
def preact_gelu(u, b):
    return gelu(u + b)


def _preact_fwd(u, b):
    z = u + b
    return gelu(z), z


def _preact_bwd(z, g):
    (z,) = jax.lax.optimization_barrier((z,))
    _, vjp = jax.vjp(gelu, z)
    (dz,) = vjp(g)
    return dz, dz.sum(tuple(range(dz.ndim - 1)))


preact_gelu.defvjp(_preact_fwd, _preact_bwd)

ACTIVATIONS = {"dsjax": bias_gelu, "autodiff": lambda u, b: gelu(u + b), "preact": preact_gelu}


def timed(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / 10 * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", default="dsjax,autodiff,preact")
    args = parser.parse_args()
    D, F = 768, 3072
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (args.tokens, D), jnp.bfloat16)
    w_fc = (jax.random.normal(ks[1], (D, F)) * 0.02).astype(jnp.bfloat16)
    b_fc = (jax.random.normal(ks[2], (F,)) * 0.02).astype(jnp.bfloat16)
    w_proj = (jax.random.normal(ks[3], (F, D)) * 0.02).astype(jnp.bfloat16)
    r = jax.random.normal(ks[4], (args.tokens, D), jnp.bfloat16)
    for name in args.variants.split(","):
        act = ACTIVATIONS[name]

        def mlp(x, w_fc, b_fc, w_proj, act=act):
            return act(x @ w_fc, b_fc) @ w_proj

        def loss(x, w_fc, b_fc, w_proj, mlp=mlp):
            return jnp.vdot(mlp(x, w_fc, b_fc, w_proj).astype(jnp.float32), r.astype(jnp.float32))

        fwd = jax.jit(mlp)
        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        inputs = (x, w_fc, b_fc, w_proj)
        epilogues = {}
        for label, fn in (("fwd", fwd), ("fwd_bwd", both)):
            hlo = fn.lower(*inputs).compile().as_text()
            found = re.findall(r'custom_call_target="(__cublas[^"]*)".*?"epilogue":"?(\w+)', hlo)
            epilogues[label] = [f"{t}:{e}" for t, e in found]
        row = {
            "variant": name,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "tokens": args.tokens,
            "fwd_ms": round(timed(fwd, inputs, args.reps), 4),
            "fwd_bwd_ms": round(timed(both, inputs, args.reps), 4),
            "epilogues": epilogues,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
