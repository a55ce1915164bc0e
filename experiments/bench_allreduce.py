"""All-reduce bus bandwidth through dsjax.CommContext next to the same collective in plain JAX.

Run one process per GPU through the launcher (here 2 GPUs; the figures are in experiments/RESULTS.md):

    python -m dsjax.launch --nproc=2 --run=experiments/bench_allreduce.py -- --out=allreduce.json

Each size (1 MiB to 1 GiB of float32 per process by default) is reduced `--iters` times after `--warmup`
calls, each call timed to completion, the three ways below taking turns; the median is reported. Bus
bandwidth follows nccl-tests:
bytes * 2 (n - 1) / n / time. "plain JAX" is a jitted shard_map psum over the same one-device-per-process
mesh, on an array already laid out over it, so the difference is CommContext's own per-call work
(assembling the global array, the cached program lookup, picking the local result); "plain_assembled_ms"
times the plain program on a global array assembled from the local one in each call, as CommContext must
(a process holds only its own array). On CPUs the same
command runs over Gloo (add --cpu-devices-per-proc=1), for a check of the script, not a figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import dsjax as ds


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--min-mib", type=float, default=1)
    p.add_argument("--max-mib", type=float, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = ds.distributed.initialize()

    import jax  # after initialize: it must come before JAX starts its devices
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    comm = ds.CommContext()
    n = comm.get_world_size()
    mesh = comm.mesh
    plain = jax.jit(
        jax.shard_map(lambda b: jax.lax.psum(b, "process"), mesh=mesh, in_specs=P("process"), out_specs=P())
    )

    split = NamedSharding(mesh, P("process"))

    def assembled(shape, local):  # the plain program on a global array built from the local one
        return plain(jax.make_array_from_single_device_arrays(shape, split, [local]))

    def timed(calls: list) -> list[float]:
        """Median time of each (fn, arg) call; the calls take turns in every iteration, so a drift of the
        machine (clocks, a first large allocation) falls on all of them alike."""
        for _ in range(args.warmup):
            for fn, arg in calls:
                jax.block_until_ready(fn(arg))
        times = [[] for _ in calls]
        for i in range(args.iters):
            for k in range(len(calls)):  # rotate the order too
                fn, arg = calls[(i + k) % len(calls)]
                start = time.perf_counter()
                jax.block_until_ready(fn(arg))
                times[(i + k) % len(calls)].append(time.perf_counter() - start)
        return [statistics.median(t) for t in times]

    rows = []
    mib = args.min_mib
    while mib <= args.max_mib:
        count = int(mib * 2**20) // 4
        x = jax.device_put(jnp.full((count,), float(comm.get_rank() + 1), jnp.float32), comm.device)
        joined = jax.make_array_from_single_device_arrays((n * count,), split, [x])
        assert float(comm.all_reduce(x)[0]) == n * (n + 1) / 2
        t_comm, t_plain, t_fresh = timed(
            [(comm.all_reduce, x), (plain, joined), (functools.partial(assembled, joined.shape), x)]
        )
        bus = 4 * count * 2 * (n - 1) / n
        row = {
            "MiB": mib,
            "comm_ms": 1e3 * t_comm,
            "plain_ms": 1e3 * t_plain,
            "plain_assembled_ms": 1e3 * t_fresh,
            "comm_busbw_GBps": bus / t_comm / 1e9,
            "plain_busbw_GBps": bus / t_plain / 1e9,
        }
        row["comm_vs_plain"] = row["comm_busbw_GBps"] / row["plain_busbw_GBps"]
        rows.append(row)
        if env.process_id == 0:
            print(
                f"{mib:8.0f} MiB  CommContext {row['comm_ms']:8.3f} ms {row['comm_busbw_GBps']:7.1f} GB/s   "
                f"plain JAX {row['plain_ms']:8.3f} ms {row['plain_busbw_GBps']:7.1f} GB/s "
                f"({row['plain_assembled_ms']:8.3f} ms assembled per call)   "
                f"ratio {row['comm_vs_plain']:.3f}",
                flush=True,
            )
        del x, joined
        mib *= 4
    if env.process_id == 0 and args.out:
        device = jax.local_devices()[0]
        with open(args.out, "w") as f:
            json.dump(
                {"processes": n, "device": device.device_kind, "backend": comm.backend, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
