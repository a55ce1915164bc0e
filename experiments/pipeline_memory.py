"""Compiled per-device temporaries of the pipelined train step for M = P, 2P, 4P microbatches, GPipe vs
1F1B, at a fixed microbatch of 2 sequences (global batch 2M), on simulated CPU devices, for the remat
policies `none` and `full` (1F1B keeps what the policy saves for 2P microbatches). Prints a table.

Usage: PYTHONPATH=. python experiments/pipeline_memory.py
"""

from __future__ import annotations

import jax

from dsjax.mesh import simulate_cpu_devices

simulate_cpu_devices(8)

from dsjax.config import (  # noqa: E402
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    PipelineConfig,
    RematConfig,
    TrainConfig,
)
from dsjax.train import build  # noqa: E402

MODEL = ModelConfig(family="llama", n_layers=8, d_model=64, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=128)


def temporaries_mib(stages: int, schedule: str, microbatches: int, remat: str) -> float:
    cfg = Config(
        model=MODEL,
        mesh=MeshConfig(pipeline=stages, fsdp=1),
        data=DataConfig(source="synthetic"),
        train=TrainConfig(batch_size=2 * microbatches, seq_len=128),
        pipeline=PipelineConfig(schedule=schedule, microbatches=microbatches),
        remat=RematConfig(policy=remat),
    )
    run = build(cfg, devices=jax.devices()[:stages], abstract=True)
    batch = jax.ShapeDtypeStruct((2 * microbatches, 129), jax.numpy.int32, sharding=run.batch_sharding)
    return run.train_step.lower(run.state, batch).compile().memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    print(f"jax {jax.__version__}, {MODEL}")
    print("| remat | P | schedule | M = P | M = 2P | M = 4P |\n|---|---|---|---|---|---|")
    for remat in ("none", "full"):
        for stages in (2, 4):
            for schedule in ("gpipe", "1f1b"):
                counts = (stages, 2 * stages, 4 * stages)
                cells = [f"{temporaries_mib(stages, schedule, m, remat):.2f} MiB" for m in counts]
                print(f"| {remat} | {stages} | {schedule} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
