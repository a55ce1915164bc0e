"""What 1F1B keeps per microbatch: the stage's backward-pass residuals that depend on its input, and the
compiled train step's temporaries, for bf16 compute (fp32 weights) under remat policies, on simulated CPU
devices. Prints one line per policy.

Usage: PYTHONPATH=. python experiments/pipeline_residuals.py [--policies=none,dots]

Model: llama, 8 layers, D=128, F=512, vocab 256, T=128; mesh pipeline=2, M=4 microbatches of 2 sequences.
It also runs 3 train steps and prints the loss (the same loss whatever the loop keeps is the check).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dsjax.mesh import simulate_cpu_devices

simulate_cpu_devices(8)

from flax import nnx  # noqa: E402

from dsjax import pipeline_1f1b  # noqa: E402
from dsjax.config import (  # noqa: E402
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    PipelineConfig,
    PrecisionConfig,
    RematConfig,
    TrainConfig,
)
from dsjax.train import batch_at, build  # noqa: E402

MODEL = ModelConfig(
    family="llama", n_layers=8, d_model=128, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=128, vocab_size=256
)
P, M, MICRO, T = 2, 4, 2, 128


def measure(policy: str) -> str:
    cfg = Config(
        model=MODEL,
        mesh=MeshConfig(pipeline=P, fsdp=1),
        data=DataConfig(source="synthetic"),
        precision=PrecisionConfig(policy="bf16"),
        remat=RematConfig(policy=policy),
        train=TrainConfig(batch_size=MICRO * M, seq_len=T),
        pipeline=PipelineConfig(schedule="1f1b", microbatches=M),
    )
    run = build(cfg, devices=jax.devices()[:P])
    model = nnx.merge(run.graphdef, run.state.params)
    layers = MODEL.n_layers // P
    w = {k: jax.ShapeDtypeStruct((layers, *v.shape[1:]), v.dtype) for k, v in model.blocks.arrays().items()}
    w = jax.eval_shape(model.compute_weights, w)  # what the 1F1B loop hands its stages
    x = jax.ShapeDtypeStruct((MICRO, T, MODEL.d_model), jnp.bfloat16)
    flags, avals = pipeline_1f1b._stage_residuals(model.stage_fn(T, None), w, x)
    kept = [a for a, f in zip(avals, flags, strict=True) if f]
    batch = batch_at(run, run.train_samples, 0)
    compiled = run.train_step.lower(run.state, batch).compile()
    state, metrics = run.state, None
    for _ in range(3):
        state, metrics = compiled(state, batch)
    kept_mib = sum(a.size * a.dtype.itemsize for a in kept) / 2**20
    temporaries_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return (
        f"remat {policy}: {len(avals)} residuals, {len(kept)} kept per microbatch ({kept_mib:.2f} MiB per stage), "
        f"temporaries {temporaries_mib:.1f} MiB, loss after 3 steps {float(metrics['loss']):.6f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="none,dots")
    args = parser.parse_args()
    print(f"jax {jax.__version__}")
    for policy in args.policies.split(","):
        print(measure(policy), flush=True)


if __name__ == "__main__":
    main()
