"""Time of the pipeline loops' stage-to-stage send: a roll by one slot of a (P, ...) array split over P GPUs.

Usage (a machine with P GPUs): PYTHONPATH=. python experiments/bench_permute.py [--gpus=2] [--mib=8,32,128]
    [--reps=20] [--tag=TEXT]

`jnp.roll(x, 1, axis=0)` of a bf16 array whose axis 0 is split over the GPUs is what `dsjax.pipeline` does
at the end of every tick; XLA lowers it to one collective permute (NCCL send/receive pairs). Each size is
the bytes each GPU sends; the median of --reps jitted calls (one block per call) is printed with the
bandwidth per GPU, one JSON line per size. NCCL reads its environment (NCCL_*) once per process, so compare
settings by running the script once per setting (--tag names the run in its output).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_loss_kernel import timed  # experiments/ is on sys.path when run as a script
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--mib", default="8,32,128")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[: args.gpus]), ("pipeline",))
    split = NamedSharding(mesh, P("pipeline"))
    roll = jax.jit(lambda x: jnp.roll(x, 1, axis=0), out_shardings=split)
    for mib in (int(v) for v in args.mib.split(",")):
        x = jax.device_put(jnp.ones((args.gpus, mib * 2**19), jnp.bfloat16), split)
        ms = timed(roll, x, reps=args.reps)
        row = {"tag": args.tag, "gpus": args.gpus, "device": jax.devices()[0].device_kind, "mib_per_gpu": mib}
        print(json.dumps({**row, "ms": round(ms, 4), "GBps_per_gpu": round(mib * 2**20 / ms / 1e6, 1)}))


if __name__ == "__main__":
    main()
