"""The LM head + cross-entropy, forward and backward, with the logits' gradient made in either pass.

Usage: python experiments/bench_head_loss.py [--batch=32] [--seq=1024] [--dim=768] [--vocab=50304]
    [--dtype=bfloat16] [--reps=20] [--out=FILE]

GPT-2 124M's head at batch 32 by default. Times value_and_grad of the mean loss over (x, w), median of
--reps calls, for:
- 'forward_grad': dsjax's `head_cross_entropy` (the forward pass writes softmax - onehot, the Pallas kernel
  reads each row of logits twice; the backward pass feeds the stored gradient to the two GEMMs);
- 'backward_grad_*': the forward pass computes only each row's logsumexp (one read of the logits, no
  write) and keeps the logits; the backward pass forms exp(logits - lse) - onehot and hands it to the two
  GEMMs, where XLA may fuse it into Triton GEMMs or write it once for cuBLAS. '_xla' takes the logsumexp
  from XLA's one-pass reduction, '_pallas' from a one-loop Pallas kernel;
- 'backward_grad_barrier': the same with the gradient written once in front of the GEMMs (an optimization
  barrier stops XLA from fusing it).
Each variant's loss and gradients are compared with 'forward_grad' (relative differences in its line).
One JSON line per variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from dsjax.models import xent
    from dsjax.models.decoder import head_cross_entropy

    dtype = jnp.dtype(args.dtype)
    spec = "BTD,VD->BTV"
    kx, kw, kl = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, args.seq, args.dim), jnp.float32).astype(dtype)
    w = (0.02 * jax.random.normal(kw, (args.vocab, args.dim), jnp.float32)).astype(dtype)
    labels = jax.random.randint(kl, (args.batch, args.seq), 0, args.vocab)

    def lse_kernel(logits_ref, label_ref, lse_ref, picked_ref, *, block):
        lse_ref[0], picked_ref[0] = xent.row_stats(logits_ref, label_ref[0], block, eviction_policy=None)

    def lse_pallas(logits, labels):
        R, V = logits.shape
        row = pl.BlockSpec((None, 1), lambda i: (i, 0))
        lse, picked = pl.pallas_call(
            functools.partial(lse_kernel, block=2048),
            grid=(R,),
            in_specs=[pl.BlockSpec((None, V), lambda i: (i, 0)), row],
            out_specs=[row, row],
            out_shape=[jax.ShapeDtypeStruct((R, 1), jnp.float32)] * 2,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=jax.default_backend() != "gpu",
            name="dsjax_lse",
        )(logits, labels.astype(jnp.int32).reshape(R, 1))
        return lse[:, 0], picked[:, 0]

    def lse_xla(logits, labels):
        return xent._lse_and_picked(logits.astype(jnp.float32), labels)

    def backward_grad(lse_impl, barrier):
        @jax.custom_vjp
        def loss(x, w, labels):
            logits = jnp.einsum(spec, x, w, preferred_element_type=dtype).reshape(-1, args.vocab)
            lse, picked = lse_impl(logits, labels.reshape(-1))
            return (lse - picked).reshape(labels.shape)

        def fwd(x, w, labels):
            logits = jnp.einsum(spec, x, w, preferred_element_type=dtype)
            lse, picked = lse_impl(logits.reshape(-1, args.vocab), labels.reshape(-1))
            return (lse - picked).reshape(labels.shape), (x, w, logits, lse.reshape(labels.shape), labels)

        def bwd(res, g):
            x, w, logits, lse, labels = res
            vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, 2)
            unit = (jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - (vocab == labels[..., None])).astype(dtype)
            if barrier:
                unit = jax.lax.optimization_barrier(unit)
            g = g[..., None]
            dx = jnp.einsum("BTV,VD->BTD", unit, w, preferred_element_type=jnp.float32)
            scaled = (x.astype(jnp.float32) * g).astype(dtype)
            dw = jnp.einsum("BTV,BTD->VD", unit, scaled, preferred_element_type=jnp.float32)
            return (dx * g).astype(dtype), dw.astype(w.dtype), None

        loss.defvjp(fwd, bwd)
        return loss

    variants = {
        "forward_grad": lambda x, w, labels: head_cross_entropy(x, w, labels, spec, dtype, None, "pallas"),
        "backward_grad_xla": backward_grad(lse_xla, False),
        "backward_grad_pallas": backward_grad(lse_pallas, False),
        "backward_grad_barrier": backward_grad(lse_pallas, True),
    }
    reference = None
    for name, fn in variants.items():
        step = jax.jit(jax.value_and_grad(lambda x, w, fn=fn: jnp.mean(fn(x, w, labels)), argnums=(0, 1)))
        out = jax.block_until_ready(step(x, w))
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(step(x, w))
            times.append(time.perf_counter() - start)
        line = {"variant": name, "shape": [args.batch * args.seq, args.dim, args.vocab], "dtype": dtype.name}
        line["ms"] = round(1e3 * statistics.median(times), 3)
        if reference is None:
            reference = out
        else:
            line["loss_rel_diff"] = float(abs(out[0] - reference[0]) / abs(reference[0]))
            for i, label in ((0, "dx"), (1, "dw")):
                a, b = out[1][i].astype(jnp.float32), reference[1][i].astype(jnp.float32)
                line[f"{label}_rel_l2"] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
