"""One process of the multi-process CommContext test (tests/test_distributed.py runs it under
`python -m dsjax.launch`). Every verb is checked against NumPy on the inputs all ranks would have given;
prints "comm ok <rank> <checks>" at the end, exits non-zero at the first wrong value."""

import sys

import numpy as np

import dsjax as ds

env = ds.distributed.initialize()

import jax  # noqa: E402  (after initialize: it must come before JAX starts its devices)
import jax.numpy as jnp  # noqa: E402

comm = ds.CommContext()
rank, n = comm.get_rank(), comm.get_world_size()
assert (rank, n) == (env.process_id, env.num_processes) == (jax.process_index(), jax.process_count())
assert comm.get_local_rank() == env.local_rank
checks = 0


def value(r: int, shape, dtype) -> np.ndarray:
    """Rank r's input: distinct per rank and per element, exact in every dtype used."""
    x = (np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) % 7) + 3 * r - 2
    return x.astype(dtype)


def same(got, want, what: str) -> None:
    global checks
    got = np.asarray(jax.device_get(got)).astype(np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2 if "bfloat16" in what else 1e-6):
        print(f"rank {rank}: {what}: got {got} want {want}", flush=True)
        sys.exit(1)
    checks += 1


for dtype in (np.float32, np.int32, jnp.bfloat16):
    for shape in ((), (6,), (4, 3)):
        what = f"{np.dtype(dtype).name}{list(shape)}"
        mine = value(rank, shape, dtype)
        everyone = np.stack([value(r, shape, dtype).astype(np.float64) for r in range(n)])
        for op, reduce in (("sum", np.sum), ("max", np.max), ("min", np.min), ("mean", np.mean)):
            if op == "mean" and dtype is np.int32:
                continue
            same(comm.all_reduce(mine, op), reduce(everyone, axis=0), f"all_reduce {op} {what}")
            if shape and shape[0] % n == 0:
                chunk = shape[0] // n
                want = reduce(everyone, axis=0)[rank * chunk : (rank + 1) * chunk]
                same(comm.reduce_scatter(mine, op), want, f"reduce_scatter {op} {what}")
        same(comm.all_gather(mine), everyone, f"all_gather {what}")
        for src in {0, n - 1}:
            same(comm.broadcast(mine, src), everyone[src], f"broadcast from {src} {what}")
comm.barrier()
comm.barrier("named")

# A mistake on one rank (shapes this context has not seen yet) is a clear error on every rank, not a hang.
try:
    comm.all_reduce(np.zeros(100 + rank, np.float32))
    print(f"rank {rank}: mismatched shapes were not caught", flush=True)
    sys.exit(1)
except ds.distributed.DistributedError as err:
    assert "disagree" in str(err), err
print(f"comm ok {rank} {checks}", flush=True)
