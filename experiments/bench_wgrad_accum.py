"""Micro-benchmark: summing weight gradients over microbatches into fp32 accumulators.

Usage (one GPU): PYTHONPATH=. python experiments/bench_wgrad_accum.py [--tokens=2048] [--layers=8] [--ticks=8]

A pipeline tick (or a gradient-accumulation microbatch) adds each weight's gradient, x^T dy over the
microbatch's tokens, into an fp32 accumulator. Shapes: one llama-1b pipeline stage (D 2048, F 8192, 8 kv
heads of 64), one microbatch of `--tokens` tokens. Modes, each a scan over `--ticks` ticks:
- `bf16`: the GEMM writes dW in bf16, a fusion converts it to fp32 and adds it (what autodiff of a bf16
  matmul gives);
- `f32`: the GEMM writes dW in fp32 (`preferred_element_type`), then the add;
- `f32_masked`: as `f32`, with the gradient put through `where(valid, dW, 0)` before the add;
- `gemm`: the fp32 GEMMs alone, each tick's result replacing the last (no add): the floor.
Prints one JSON line per mode (median of `--reps` timed calls, ms per tick), the cuBLAS calls of the
optimized HLO and how many of them have beta = 1 (XLA folded the add into the GEMM).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp


def shapes(D: int, F: int, KH: int) -> dict[str, tuple[int, int]]:
    return dict(wq=(D, D), wk=(D, KH), wv=(D, KH), wo=(D, D), w_gate=(D, F), w_up=(D, F), w_down=(F, D))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ticks", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--modes", default="gemm,bf16,f32,f32_masked")
    args = parser.parse_args()
    T, L, n = args.tokens, args.layers, args.ticks
    ws = shapes(2048, 8192, 512)
    key = iter(jax.random.split(jax.random.key(0), 2 * len(ws)))
    xs = {k: jax.random.normal(next(key), (n, L, T, i), jnp.bfloat16) for k, (i, o) in ws.items()}
    gs = {k: jax.random.normal(next(key), (n, L, T, o), jnp.bfloat16) for k, (i, o) in ws.items()}
    acc0 = [{k: jnp.zeros(s, jnp.float32) for k, s in ws.items()} for _ in range(L)]

    def make(mode):
        def tick(acc, inp):
            t, x, g = inp
            new = []
            for layer in range(L):
                out = {}
                for k in ws:
                    if mode == "bf16":
                        d = jnp.einsum("ti,to->io", x[k][layer], g[k][layer]).astype(jnp.float32)
                    else:
                        d = jnp.einsum("ti,to->io", x[k][layer], g[k][layer], preferred_element_type=jnp.float32)
                    if mode == "f32_masked":
                        d = jnp.where(t % 3 != 1, d, 0.0)
                    out[k] = d if mode == "gemm" else acc[layer][k] + d
                new.append(out)
            return new, None

        @jax.jit
        def run(acc, xs, gs):
            return jax.lax.scan(tick, acc, (jnp.arange(n), xs, gs))[0]

        return run

    for mode in args.modes.split(","):
        run = make(mode)
        compiled = run.lower(acc0, xs, gs).compile()
        hlo = compiled.as_text()
        calls = re.findall(r"custom_call_target=\"(__cublas[^\"]*)\"([^\n]*)", hlo)
        gemms = [rest for target, rest in calls]
        beta1 = sum(re.search(r'"beta":\s*1[,}]', rest) is not None for rest in gemms)
        targets = sorted({target for target, _ in calls})
        jax.block_until_ready(compiled(acc0, xs, gs))
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(acc0, xs, gs))
            times.append((time.perf_counter() - start) * 1e3 / n)
        row = dict(mode=mode, tokens=T, layers=L, ticks=n, ms_per_tick=round(statistics.median(times), 4))
        row.update(cublas_calls=len(gemms), beta1_calls=beta1, targets=targets, triton_gemms=hlo.count("__triton_gemm"))
        row.update(device=jax.devices()[0].device_kind)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
