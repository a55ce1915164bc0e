"""Probe: why the first copy of a process into pinned host memory is slow, and whether pinning ahead helps.

Usage (one fresh process per mode, on a GPU; from the repository root):
    PYTHONPATH=. python experiments/probe_pinned_host.py copy fresh|prepin|prepin_empty|prepin_big
    PYTHONPATH=. python experiments/probe_pinned_host.py startup none|during|before

`copy` makes llama-1b's train state (fp32 parameters and two AdamW moments, 438 arrays, 14.8 GB) on the
first GPU and times copying every array into pinned host memory, as Orbax's save does, twice (first_s,
second_s). With `prepin` the same amount of pinned host memory is first made from host zeros, one buffer per
array, and freed (prepin_s); `prepin_empty` does so from uninitialised host buffers, `prepin_big` as one
buffer of the total size.

`startup` builds llama-1b (batch 8) as python -m dsjax.train does and times the compilation of its train
step (compile_s) with dsjax.checkpoint.Checkpointer.reserve_host_memory started just before it (`during`),
run to completion before it (`before`), or not at all (`none`); startup_s is build + reservation + compile.
Each prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def copy(mode: str) -> dict:
    if mode not in ("fresh", "prepin", "prepin_empty", "prepin_big"):
        raise SystemExit(f"unknown copy mode {mode!r}")
    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    d, f, vocab, layers = 2048, 8192, 128256, 16
    layer = [(d, d), (d, 512), (d, 512), (d, d), (d, f), (d, f), (f, d), (d,), (d,)]
    shapes = ([(vocab, d), (d,)] + layer * layers) * 3
    total = sum(int(np.prod(s)) for s in shapes) * 4
    arrays = jax.block_until_ready([jnp.full(s, 1.0, jnp.float32) for s in shapes])
    record = {"mode": mode, "arrays": len(shapes), "gb": round(total / 1e9, 2)}

    def to_pinned() -> float:
        start = time.perf_counter()
        jax.block_until_ready([jax.device_put(a, pinned) for a in arrays])  # freed at once
        return round(time.perf_counter() - start, 3)

    if mode != "fresh":
        start = time.perf_counter()
        if mode == "prepin":
            zeros = np.zeros(max(int(np.prod(s)) for s in shapes), np.float32)
            held = [jax.device_put(zeros[: int(np.prod(s))].reshape(s), pinned) for s in shapes]
        elif mode == "prepin_empty":
            held = [jax.device_put(np.empty(s, np.float32), pinned) for s in shapes]
        else:  # prepin_big
            held = [jax.device_put(np.zeros(total // 4, np.float32), pinned)]
        jax.block_until_ready(held)
        record["prepin_s"] = round(time.perf_counter() - start, 3)
        del held
    record["first_s"] = to_pinned()
    record["second_s"] = to_pinned()
    return record


def startup(mode: str) -> dict:
    if mode not in ("none", "during", "before"):
        raise SystemExit(f"unknown startup mode {mode!r}")
    from dsjax import checkpoint as ckpt
    from dsjax import xla_flags
    from dsjax.config import apply_overrides, preset
    from dsjax.train import build, prepare

    xla_flags.apply()
    xla_flags.default_memory_fraction()
    config = apply_overrides(preset("llama-1b"), {"train.batch_size": "8", "data.source": "synthetic"})
    t0 = time.perf_counter()
    run = build(config)
    jax.block_until_ready(run.state)
    saver = ckpt.Checkpointer("/tmp/dsjax-probe-ckpt", config.checkpoint, log=lambda _: None)
    t1 = time.perf_counter()
    if mode in ("during", "before"):
        saver.reserve_host_memory(run.state)
        if mode == "before":
            saver.wait()  # joins the reservation
    t2 = time.perf_counter()
    prepare(run, log=lambda _: None)
    t3 = time.perf_counter()
    saver.close()
    return {
        "mode": mode,
        "build_s": round(t1 - t0, 2),
        "reserve_before_s": round(t2 - t1, 2),
        "compile_s": round(t3 - t2, 2),
        "reserved_s": saver.reserved and round(saver.reserved[1], 2),
        "startup_s": round(t3 - t0, 2),
    }


if __name__ == "__main__":
    kind, mode = sys.argv[1:3]
    print(json.dumps({"copy": copy, "startup": startup}[kind](mode)))
