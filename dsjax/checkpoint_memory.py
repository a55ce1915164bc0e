"""Memory a checkpoint save takes beside training (dsjax.checkpoint uses these; Orbax is not imported
here): the copy of the state on its devices that lets training go on while a save is handed to Orbax,
whether a device has room for it, and the pinned host memory Orbax copies saves into on GPUs, which is
made ahead of the first save."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def device_copy(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """New buffers, with the same shardings (so on the same devices), holding the values of `arrays`."""
    return copier(arrays)(arrays)


def copier(arrays: dict) -> Callable:
    """The one program that copies `arrays` (jax.Arrays or ShapeDtypeStructs with shardings)."""
    return _copier_for(tuple((key, x.sharding) for key, x in arrays.items()))


@functools.lru_cache(maxsize=4)
def _copier_for(shardings: tuple) -> Callable:
    return jax.jit(lambda arrays: {key: jnp.copy(x) for key, x in arrays.items()}, out_shardings=dict(shardings))


def device_room(arrays: dict[str, jax.Array], margin: float = 0.05) -> str | None:
    """None when every device that holds part of `arrays` has room for one more copy of its part next to
    the most it has held so far (a training step's peak), with `margin` of its memory to spare (the
    allocator's fragmentation); otherwise what is missing, as a sentence. Devices without memory statistics
    (CPU) are taken to have room."""
    need: dict = {}
    for x in arrays.values():
        for shard in x.addressable_shards:
            need[shard.device] = need.get(shard.device, 0) + shard.data.nbytes
    for device, nbytes in need.items():
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            continue
        free = stats["bytes_limit"] - stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))
        if nbytes + margin * stats["bytes_limit"] > free:
            return (
                f"{device} has {free / 2**30:.2f} GiB free at its peak, and its part of the state is "
                f"{nbytes / 2**30:.2f} GiB (plus {margin:.0%} of its memory kept spare)"
            )
    return None


def orbax_pins_host() -> bool:
    """Whether Orbax copies saves into pinned host memory here: its default, on GPUs."""
    return jax.default_backend() == "gpu"


def host_copy_shares(arrays: dict[str, jax.Array]) -> dict[Any, int]:
    """Bytes of host memory each local device's part of a save is copied into, for the devices that have
    pinned host memory, by Orbax's rule: one replica of each shard is saved; by default the replicas of a
    shard each copy a slice of it, where one of its axes divides by their number, and otherwise, or with
    JAX_PLATFORMS naming gpu or cuda (which turns the slicing off), its first replica copies all of it."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    sliced = "gpu" not in platforms and "cuda" not in platforms
    local = {d for d in jax.local_devices() if any(m.kind == "pinned_host" for m in d.addressable_memories())}
    shares: dict[Any, int] = {}
    for x in arrays.values():
        holders: dict[tuple, list] = {}  # shard index -> the devices holding a replica of it, in order
        for device, index in x.sharding.devices_indices_map(x.shape).items():
            holders.setdefault(tuple((i.start, i.stop, i.step) for i in index), []).append(device)
        shape = x.sharding.shard_shape(x.shape)
        nbytes = int(np.prod(shape)) * x.dtype.itemsize
        for devices in holders.values():
            n = len(devices)
            if sliced and n > 1 and nbytes and any(size % n == 0 for size in shape):
                parts = [(device, nbytes // n) for device in devices]
            else:
                parts = [(devices[0], nbytes)]
            for device, part in parts:
                if device in local:
                    shares[device] = shares.get(device, 0) + part
    return shares


def pinned_buffers(shares: dict[Any, int]) -> list[jax.Array]:
    """One buffer of pinned host memory per device of `shares`, of its bytes, made from host zeros."""
    pinned = [(device, nbytes) for device, nbytes in shares.items() if nbytes]
    zeros = np.zeros(max((nbytes for _, nbytes in pinned), default=0), np.uint8)
    return [
        jax.device_put(zeros[:nbytes], jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
        for device, nbytes in pinned
    ]


def reserve_pinned_host(shares: dict[Any, int]) -> int:
    """Make pinned host memory for `shares` (host_copy_shares) and free it again; returns the bytes. On GPUs
    Orbax copies every save into pinned host memory, and the runtime keeps what it pinned once for later
    allocations (of any size: one large buffer freed serves many smaller arrays): the first save of a
    process, which pins it all, took 8-15 s for llama-1b and later ones 0.3 s; after this, the first one
    took 0.3 s too (one H200). Nothing runs on the devices: host to pinned host is a host copy."""
    jax.block_until_ready(pinned_buffers(shares))
    return sum(shares.values())
