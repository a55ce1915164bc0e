"""Micro-benchmark of the LM head's softmax cross-entropy pass over the logits (dsjax.models.xent).

Usage (GPU): PYTHONPATH=. python experiments/bench_loss_kernel.py [--rows=32768 --vocab=50304] [--reps=20]
    [--dtype=float32|bfloat16|float16] [--configs=BLOCK:WARPS[:STAGES],...] [--mosaic=CHUNK,...]

Times, on random logits (R, V) of --dtype, the loss and its bf16 gradient softmax - onehot computed
(a) as dsjax did before the kernel: the loss in the forward pass, the gradient (times the cotangent) from
    the stored logits in the backward pass (two XLA kernels),
(b) by the 'xla' implementation of loss_and_unit_grad (the same two passes, both in the forward pass),
(c) by the Pallas (Triton) kernel at several (block, warps, Triton pipeline stages) settings,
(d) by the Mosaic GPU kernel at several register chunks (Hopper GPUs; the gradient in the logits' dtype;
    --mosaic= skips it),
each as the median of --reps timed calls (device events: one block per call), and checks (c) and (d) against (b).
Prints one JSON line per variant with ms, GB/s over the fewest bytes (logits read once, gradient written
once) and the largest differences.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dsjax.models import xent


def timed(fn, *args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--configs", default="1024:4,2048:4,2048:8,4096:8,4096:16,8192:16")
    parser.add_argument("--mosaic", default="8192", help="Mosaic kernel chunks CHUNK,... ('' for none)")
    parser.add_argument("--dtype", default="float32", help="the logits' dtype: float32, bfloat16 or float16")
    args = parser.parse_args()
    R, V = args.rows, args.vocab
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = (4 * jax.random.normal(k1, (R, V), jnp.float32)).astype(args.dtype)
    labels = jax.random.randint(k2, (R,), 0, V)
    g = jnp.full((R,), 1.0 / R, jnp.float32)
    floor_bytes = R * V * (logits.dtype.itemsize + 2)

    @jax.jit
    def before(logits, labels, g):  # the pre-kernel code: loss forward, gradient backward from the logits
        loss = xent.loss_only(logits, labels)
        vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, 1)
        probs = jnp.exp(logits - (loss + jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])[:, None])
        return loss, ((probs - (vocab == labels[:, None])) * g[:, None]).astype(jnp.bfloat16)

    xla = jax.jit(functools.partial(xent._xla, grad_dtype=jnp.bfloat16))
    ref_loss, ref_grad = xla(logits, labels)
    rows = []

    def measured(name, fn, floor_bytes=floor_bytes):
        loss, grad = fn(logits, labels)
        ms = timed(fn, logits, labels, reps=args.reps)
        return {
            "variant": name,
            "ms": round(ms, 3),
            "GBps_floor": round(floor_bytes / ms / 1e6, 1),
            "max_loss_diff": float(jnp.abs(loss - ref_loss).max()),
            "max_grad_diff": float(jnp.abs(grad.astype(jnp.float32) - ref_grad.astype(jnp.float32)).max()),
            "nan": bool(jnp.isnan(grad.astype(jnp.float32)).any() | jnp.isnan(loss).any()),
        }

    for name, fn, fargs in (("before", before, (logits, labels, g)), ("xla", xla, (logits, labels))):
        ms = timed(fn, *fargs, reps=args.reps)
        rows.append({"variant": name, "ms": round(ms, 3), "GBps_floor": round(floor_bytes / ms / 1e6, 1)})
    for config in filter(None, args.configs.split(",")):
        block, warps, stages = (int(v) for v in (config + ":1").split(":")[:3])
        fn = jax.jit(
            functools.partial(xent._pallas_rows, grad_dtype=jnp.bfloat16, block=block, warps=warps, stages=stages)
        )
        rows.append(measured(f"pallas block={block} warps={warps} stages={stages}", fn))
    for config in filter(None, args.mosaic.split(",")):
        fn = jax.jit(functools.partial(xent._mosaic_rows, chunk=int(config)))
        name = f"mosaic chunk={config}"
        rows.append(measured(name, fn, 2 * logits.nbytes))  # its gradient is in the logits' dtype
    device = jax.devices()[0].device_kind
    for row in rows:
        print(json.dumps({"device": device, "rows": R, "vocab": V, "dtype": args.dtype, **row}))


if __name__ == "__main__":
    main()
