"""Checkpoints: Orbax saves of the whole train state plus the data position, verified by a manifest of
file hashes, restored onto any mesh. The only module of dsjax that imports Orbax.

A checkpoint is a directory `<checkpoint.dir>/<step>` with two Orbax items: `state` (every array of the
TrainState: parameters, optimizer state, step, loss-scale state) and `meta` (JSON: the data position, the
global batch size, the mesh it was saved from and the full config). There is no other random state: the
data order and the initialisation derive from `train.seed`, which the config carries.

Life of a checkpoint: Orbax writes it into a temporary directory (in the background with async saves;
training waits only for a copy of the state on the devices, or where there is no room for one, for the copy
off the devices: see Checkpointer.save) and renames it to `<step>` when complete. dsjax then
writes `dsjax_manifest.json` into it: the size and SHA-256 of every file. Only a checkpoint with a manifest
that matches its files is ever restored; one without (a save cut off before the manifest, or a removed
manifest) or with a mismatch (a truncated or altered file) is reported by path and skipped for the
previous good one (`checkpoint.fallback`). Orbax deletes unfinished temporary directories when the next
run opens the directory.

Restoring reads each array straight into the sharding the current mesh wants (nothing is gathered on one
device), so a run saved on one mesh continues on any other, with any number of processes.

In a multi-process job every process writes its own shards into the same directory (which all processes
must reach); process 0 alone writes manifests, deletes old checkpoints and sets aside newer ones, and
the others wait for it (dsjax.distributed.sync) before they read what it moved.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dsjax import distributed
from dsjax.checkpoint_memory import (
    copier,
    device_copy,
    device_room,
    host_copy_shares,
    orbax_pins_host,
    reserve_pinned_host,
)
from dsjax.config import CheckpointConfig, ConfigError

MANIFEST = "dsjax_manifest.json"
REJECTED = "rejected"  # checkpoints newer than the one restored, moved aside instead of deleted
FORMAT = 1
# Exit code of a run that stopped on SIGTERM / SIGINT after saving a checkpoint (EX_TEMPFAIL: "try again",
# which is what a scheduler should do: rerun the same command to resume).
PREEMPTED_EXIT_CODE = 75
_UNDECIDED = object()


class CheckpointError(RuntimeError):
    """A save failed, or no usable checkpoint could be restored; the message names the path and reason."""


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any  # the TrainState, laid out as the target asked
    meta: dict
    path: Path


# ----------------------------------------------------------------------------------------------------
# The state as a flat {key: array} dict: a stable, Orbax-friendly layout whatever pytree types hold it.


def _key(path) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", ".", jax.tree_util.keystr(path)).strip(".")


def flatten(tree) -> dict[str, Any]:
    flat = {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if len(flat) != len(jax.tree.leaves(tree)):
        raise ValueError("two leaves of the train state map to the same checkpoint key")
    return flat


def unflatten(template, flat: dict[str, Any]):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [flat[_key(path)] for path, _ in paths])


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def is_finite(tree) -> bool:
    """True when every floating-point value of `tree` is finite (one reduction on the devices)."""
    return bool(jax.device_get(_all_finite(tree)))


# ----------------------------------------------------------------------------------------------------
# Manifests


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several files at a time (hashlib releases the GIL on large blocks)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_digest, paths))


def write_manifest(step_dir: Path) -> None:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(files, _digests(files), strict=True)
    }
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": entries}, indent=1))
    tmp.replace(step_dir / MANIFEST)


def verify(step_dir: Path) -> str | None:
    """None when every file matches the manifest; else the reason, naming the file."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save did not finish, or the manifest was removed)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    present = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(set(entries) - present):
        return f"{step_dir / name} is missing"
    names = sorted(entries)
    for name in names:
        path = step_dir / name
        size = path.stat().st_size
        if size != entries[name]["size"]:
            return f"{path} has {size} bytes, the manifest says {entries[name]['size']} (truncated or altered)"
    for name, digest in zip(names, _digests([step_dir / n for n in names]), strict=True):
        if digest != entries[name]["sha256"]:
            return f"{step_dir / name} does not match its SHA-256 in the manifest (corrupted)"
    return None


# ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the train state of one run in `directory` (see the module docstring)."""

    def __init__(
        self, directory: str | Path, cfg: CheckpointConfig, log: Callable[[str], None] = print, read_only: bool = False
    ):
        self.dir, self.cfg, self.log = Path(directory).absolute(), cfg, log
        self.primary = distributed.is_primary()
        self._lock = threading.Lock()
        self._unverified: list[int] = []  # saved by this process, manifest not yet written
        self._error: BaseException | None = None
        self._last_time = time.monotonic()
        self.last_saved: int | None = None
        self._watcher: threading.Thread | None = None
        self._warming: threading.Thread | None = None
        self._handoff: threading.Thread | None = None  # issues the Orbax save of a device copy (see save)
        self._issued: int | None = None  # the newest step whose Orbax save() call has returned
        self._no_room_told = False
        self._room: str | object | None = _UNDECIDED  # device_room() at the first save (later peaks hold the copy)
        self._writing: set[int] = set()  # manifests being written now (not to be collected meanwhile)
        self.handoff_s: list[float] = []  # per background handoff: from save() to Orbax holding the arrays on host
        self._reserving: threading.Thread | None = None  # see reserve_host_memory
        self.reserved: tuple[int, float] | None = None  # what reserve_host_memory pinned: bytes, seconds
        # Old checkpoints are deleted here, not by Orbax: only once a newer one has its manifest (Orbax's
        # max_to_keep would delete a verified checkpoint before its successor is verifiable, and while the
        # manifest thread may still be reading it). The directory is created at the first save, so a run
        # rejected before training leaves nothing behind; read-only managers (a restore from another run's
        # directory) never create, clean up or delete anything there.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,
            create=False,
            read_only=read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        with _without_read_only_notice():
            self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)

    # -- saving ---------------------------------------------------------------------------------------

    def due(self, step: int, clock: bool = True) -> bool:
        """Whether the regular schedule (every N steps, every M minutes) asks for a save at `step`. The
        minutes are looked at only when `clock`; in a multi-process job the processes then agree (one
        small collective: any process's clock decides), so every process must pass the same `clock`."""
        if step == self.last_saved:
            return False
        if self.cfg.every and step % self.cfg.every == 0:
            return True
        if not (self.cfg.every_minutes and clock):
            return False
        late = time.monotonic() - self._last_time >= 60 * self.cfg.every_minutes
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            late = bool(np.max(multihost_utils.process_allgather(np.int32(late))))
        return late

    def save(self, state, meta: dict) -> bool:
        """Save `state` as checkpoint `state.step` (asynchronously when configured); False, with a warning,
        when the state holds NaN or Inf (such a checkpoint is never written).

        With async saves Orbax copies the arrays off the devices before save() returns (0.3 s for llama-1b
        on a GPU; the first copy of a process 7-15 s, unless reserve_host_memory ran before); the file
        writes follow in the background. With checkpoint.device_copy (the default) the loop does not wait
        for that either: the state is copied on the devices (new buffers; save() returned in 8-15 ms for
        llama-1b on an H200) and a background thread hands the copy to Orbax. That needs room on each
        device for one more copy of its part of the state; without it, or in a multi-process job (where
        Orbax's save calls must stay in the main thread's order of collectives), the loop waits for the copy
        off the devices as before."""
        self.check()
        step = int(jax.device_get(state.step))
        if step == self.last_saved:
            return True
        if not is_finite(state):
            self.log(f"warning: not saving a checkpoint at step {step}: the train state holds NaN or Inf.")
            return False
        self._join_handoff()  # one save in hand at a time, issued to Orbax in step order
        self.check()
        if self.primary:  # process 0 alone writes manifests and deletes old checkpoints
            with self._lock:
                self._unverified.append(step)
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays, meta = flatten(state), {"format": FORMAT, **meta}
        copy = self._copy_on_device(arrays)  # dispatched behind the step that made `state`; no wait here
        if copy is not None:
            self._handoff = threading.Thread(
                target=self._issue,
                args=(step, copy, meta, time.perf_counter()),
                name="dsjax-checkpoint-handoff",
                daemon=True,
            )
            self._handoff.start()
        else:
            self._issue(step, arrays, meta)
            self.check()
        self.last_saved, self._last_time = step, time.monotonic()
        return True

    @property
    def _copies(self) -> bool:
        """Whether saves go through a device copy and a background handoff (see save)."""
        return self.cfg.async_save and self.cfg.device_copy and jax.process_count() == 1

    def _copy_on_device(self, arrays: dict) -> dict | None:
        """A copy of `arrays` on their devices, or None where save() should not make one."""
        if not self._copies:
            return None
        if self._room is _UNDECIDED:  # the state's layout does not change during a run
            self._room = device_room(arrays)
        missing = self._room
        if missing is None:
            try:
                return device_copy(arrays)
            except ValueError as err:  # arrays on different sets of devices cannot go through one program
                missing = f"the state's arrays cannot be copied in one program ({err})"
            except jax.errors.JaxRuntimeError as err:  # out of memory after all (fragmentation)
                missing = f"the copy failed ({str(err).splitlines()[0]})"
        if not self._no_room_told:
            self._no_room_told = True
            self.log(
                f"note: checkpoints are copied off the devices while training waits (no copy on the devices: "
                f"{missing}); set --checkpoint.device_copy=false to silence this."
            )
        return None

    def _issue(self, step: int, arrays: dict, meta: dict, background_since: float | None = None) -> None:
        """Hand checkpoint `step` to Orbax (which returns once the arrays are off the devices); in the
        background thread of save() (since perf_counter `background_since`), errors go to check()."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        try:  # Orbax first finishes the previous background save, and raises here if that one failed
            self.manager.save(step, args=args, force=True)
        except Exception as err:
            error = CheckpointError(f"saving a checkpoint to {self.dir} failed: {type(err).__name__}: {err}")
            if background_since is None:
                raise error from err
            self._error = error  # surfaced by check() (the loop calls it after its steps; save, wait, close)
            if self.primary:  # the earlier saves still get their manifests (the loop would have, in close())
                with contextlib.suppress(Exception):  # an earlier save's own failure: check() reports it
                    self.manager.wait_until_finished()
                self._write_manifests(lambda s: s < step and (self.dir / str(s)).is_dir())
            return
        self._issued = step
        if background_since is not None:
            self.handoff_s.append(time.perf_counter() - background_since)
        if self.primary and self.cfg.async_save:
            self._watch()
        elif self.primary:
            self._write_manifests(lambda step: True)

    def _join_handoff(self) -> None:
        if self._handoff is not None:
            self._handoff.join()
            self._handoff = None

    def reserve_host_memory(self, state) -> None:
        """Where Orbax copies saves into pinned host memory (GPUs), make that memory for one copy of
        `state` in a background thread (see reserve_pinned_host; 6-12.5 s for llama-1b's 14.8 GB on an
        H200). Pinning holds up other work on the GPU: beside training steps it slows them as much as the
        first save would have (a window of llama-1b steps fell from 66k to 18k tokens/s). So the training
        loop calls this before the train step compiles (the compilation then took 5-12 s longer for
        llama-1b), and waits for it after (wait_for_reservation: a step loaded from the compilation cache
        is ready before the pinning is done). A no-op elsewhere."""
        if not orbax_pins_host() or self._reserving is not None:
            return
        try:
            shares = host_copy_shares(flatten(state))
        except Exception as err:  # an optimisation only: the first save pins what it needs
            self.log(f"warning: not reserving pinned host memory for the first checkpoint ({err}).")
            return

        def work():
            start = time.perf_counter()
            try:
                self.reserved = (reserve_pinned_host(shares), time.perf_counter() - start)
            except Exception as err:  # as above
                self.log(f"warning: reserving pinned host memory for the first checkpoint failed ({err}).")

        self._reserving = threading.Thread(target=work, name="dsjax-checkpoint-reserve", daemon=True)
        self._reserving.start()

    def wait_for_reservation(self) -> None:
        """Return once reserve_host_memory's thread (if any) is done."""
        if self._reserving is not None:
            self._reserving.join()

    def warm_up(self, state) -> None:
        """Compile the non-finite check (and the device copy) for `state`'s shapes in a background thread
        while training runs, instead of inside the first save, while the loop waits (0.5 s on llama-1b)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

        def work():
            try:
                _all_finite.lower(abstract).compile()
                if self._copies:
                    copier(flatten(abstract)).lower(flatten(abstract)).compile()
            except Exception as err:  # an optimisation only: the first save compiles them if this fails
                self.log(f"warning: compiling the checkpoint's programs in the background failed ({err}).")

        # Joined by wait(): a process must not exit (and tear XLA down) while this thread is compiling.
        self._warming = threading.Thread(target=work, name="dsjax-checkpoint-warm-up", daemon=True)
        self._warming.start()

    def _finished(self, step: int) -> bool:
        """Orbax is done with `step`: its directory has its final name and no background work on it is left
        (a later save has been issued, which Orbax starts only once the previous one completed, or none is
        in progress)."""
        if not (self.dir / str(step)).is_dir():
            return False
        return (self._issued is not None and self._issued > step) or not self.manager.is_saving_in_progress()

    def _write_manifests(self, ready: Callable[[int], bool]) -> None:
        """Write the manifest of every saved step that `ready` accepts; each step is written exactly once."""
        with self._lock:
            steps = [s for s in self._unverified if ready(s)]
            self._unverified = [s for s in self._unverified if s not in steps]
            self._writing.update(steps)
        for step in steps:
            try:
                write_manifest(self.dir / str(step))
                self._collect()
            except Exception as err:  # surfaced by check()
                where = self.dir / str(step)
                self._error = CheckpointError(f"writing the manifest of checkpoint {where} failed: {err}")
            finally:
                with self._lock:
                    self._writing.discard(step)

    def _collect(self) -> None:
        """Delete finalized checkpoints older than the newest `keep` that have manifests."""
        steps = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit() and p.is_dir())
        verified = [s for s in steps if (self.dir / str(s) / MANIFEST).is_file()]
        if len(verified) <= self.cfg.keep:
            return
        oldest_kept = verified[-self.cfg.keep]
        with self._lock:
            busy = set(self._unverified) | self._writing
        for step in steps:
            if step < oldest_kept and step not in busy:
                shutil.rmtree(self.dir / str(step), ignore_errors=True)

    def _watch(self) -> None:
        """Start (once) the thread that writes each async checkpoint's manifest as soon as Orbax has
        finalized it, so a finalized checkpoint is verifiable without waiting for the next save."""
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return

            def loop():
                while True:
                    self._write_manifests(self._finished)
                    with self._lock:
                        if not self._unverified:
                            self._watcher = None  # decided under the lock: save() starts a new one if needed
                            return
                    time.sleep(0.05)

            self._watcher = threading.Thread(target=loop, name="dsjax-checkpoint-manifests", daemon=True)
            self._watcher.start()

    def check(self) -> None:
        """Raise CheckpointError if a background save (or its manifest) failed."""
        try:
            self.manager.check_for_errors()
        except Exception as err:
            raise CheckpointError(f"saving a checkpoint to {self.dir} failed: {type(err).__name__}: {err}") from err
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Finish every pending save, write its manifest and surface any failure."""
        self._join_handoff()
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(f"saving a checkpoint to {self.dir} failed: {type(err).__name__}: {err}") from err
        # Orbax has no background work left: a saved step is either finalized now or never will be.
        self._write_manifests(lambda step: (self.dir / str(step)).is_dir())
        with self._lock:
            lost, self._unverified = self._unverified, []
        for thread in (self._watcher, self._warming, self._reserving):
            if thread is not None:
                thread.join()
        self.check()
        if lost:
            raise CheckpointError(f"checkpoint(s) {lost} in {self.dir} were never finalized (the save failed)")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # -- restoring ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps Orbax finalised in the directory (verified or not), oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, target, max_step: int | None = None) -> Restored | None:
        """The checkpoint that checkpoint.restore names, read into `target`'s shapes, dtypes and shardings
        (a TrainState of arrays or jax.ShapeDtypeStructs); None when there is nothing to restore. The one
        chosen being past `max_step` (the run's train.steps) is a ConfigError, raised before anything is
        read or set aside."""
        choice = self.cfg.restore
        if choice == "none":
            return None
        if choice == "auto":
            candidates = self.steps()[::-1]
            if not candidates:
                return None
            return self._restore_first(self, candidates, target, max_step)
        if choice.isdigit():
            step, steps = int(choice), self.steps()
            if step not in steps:
                raise ConfigError(
                    f"--checkpoint.restore={choice}: no finalized checkpoint of step {step} in {self.dir} "
                    f"(there are: {steps or 'none'})."
                )
            return self._restore_first(self, [s for s in steps[::-1] if s <= step], target, max_step)
        path = Path(choice).expanduser()
        if not path.exists():
            raise ConfigError(f"--checkpoint.restore={choice!r}: {path.absolute()} does not exist.")
        is_step = path.name.isdigit() and ((path / "meta").exists() or (path / MANIFEST).exists())
        root = path.parent if is_step else path
        if root.resolve() == self.dir.resolve():
            other = self
        else:
            other = Checkpointer(root, dataclasses.replace(self.cfg, restore="auto"), self.log, read_only=True)
        try:
            steps = other.steps()
            if is_step:
                steps = [s for s in steps if s <= int(path.name)]
            if not steps:
                hint = ""
                if (path / "checkpoints").is_dir():
                    hint = f" It looks like a run directory: its checkpoints are in {path.absolute() / 'checkpoints'}."
                raise ConfigError(
                    f"--checkpoint.restore={choice!r}: {path.absolute()} holds no finalized checkpoint.{hint}"
                )
            return self._restore_first(other, steps[::-1], target, max_step)
        finally:
            if other is not self:
                other.manager.close()

    def restore_latest(self, target, at_most: int) -> Restored | None:
        """The newest good checkpoint of this directory at or before step `at_most` (falling back past
        unusable ones as checkpoint.fallback says); newer checkpoints are moved to rejected/. None when
        there is none. Used to roll back past a non-finite step."""
        candidates = [s for s in self.steps()[::-1] if s <= at_most]
        return self._restore_first(self, candidates, target) if candidates else None

    def _restore_first(
        self, source: Checkpointer, candidates: list[int], target, max_step: int | None = None
    ) -> Restored:
        problems = []
        for step in candidates:
            step_dir = source.dir / str(step)
            reason = verify(step_dir)
            if reason is None:
                if max_step is not None and step > max_step:
                    raise ConfigError(
                        f"checkpoint {step_dir} is at step {step}, past train.steps={max_step}: train.steps counts "
                        f"from step 0 of the saved run, so this run would end before its checkpoint. Give "
                        f"--train.steps={step} or more to go on from it, or --checkpoint.restore=STEP for a "
                        f"checkpoint at or before step {max_step}."
                    )
                restored = source._read(step, target)
                if source is self:
                    self._set_aside_newer_than(step)
                    self.last_saved = step  # already on disk: saving this step again is a no-op
                return restored
            problems.append(f"{step_dir}: {reason}")
            self.log(f"warning: checkpoint {step_dir} is unusable: {reason}")
            if not self.cfg.fallback:
                break
            if len(problems) < len(candidates):
                self.log("warning: falling back to the previous checkpoint (checkpoint.fallback=true).")
        raise CheckpointError(
            "no usable checkpoint: " + "; ".join(problems) + ". Start fresh in a new --out (this directory is "
            "left as it is), or point --checkpoint.restore at another checkpoint."
        )

    def _read(self, step: int, target) -> Restored:
        step_dir = self.dir / str(step)
        wanted = flatten(target)
        stored = self.manager.item_metadata(step)["state"]
        missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint {step_dir} does not hold this model's train state: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Restore it with the model config it was saved with "
                "(see its meta/config), or start a fresh run in a new --out."
            )
        for key, want in wanted.items():
            have = stored[key]
            if tuple(have.shape) != tuple(want.shape):
                raise ConfigError(
                    f"checkpoint {step_dir}: parameter {key} has shape {tuple(have.shape)} in the checkpoint "
                    f"but {tuple(want.shape)} in this model; restore with the model config it was saved with "
                    "or start a fresh run in a new --out."
                )
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in wanted.items()}
        items = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return Restored(state=unflatten(target, items["state"]), meta=dict(items["meta"]), path=step_dir)

    def _set_aside_newer_than(self, step: int) -> None:
        """Move checkpoints newer than the restored one (unusable, or from a run that went further) out of
        the way of the coming saves, into <dir>/rejected/, instead of deleting them."""
        for newer in [s for s in self.steps() if s > step] if self.primary else []:
            target = self.dir / REJECTED / f"{newer}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(self.dir / str(newer)), target)
            self.log(f"warning: moved checkpoint {self.dir / str(newer)} (newer than the one restored) to {target}")
        distributed.sync("checkpoint-set-aside")  # every process sees the moves before its next save
        self.manager.reload()


# ----------------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """Within `with Preemption() as p:`, SIGTERM and SIGINT set `p.requested` instead of killing the
    process; the training loop saves at the next step boundary and exits with PREEMPTED_EXIT_CODE. A
    second signal of the same kind acts as usual (Ctrl-C twice still interrupts at once). Handlers can
    only be installed from the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop. Multi-process runs agree on it with one small collective,
        so every process saves the same step; every process must call this at the same steps (the
        training loop asks at its log steps)."""
        if jax.process_count() == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
        return bool(np.max(flags))


class _ReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_notice():
    """Orbax warns 'Given directory is read only' for every read-only manager: on every restore from another
    run's directory, which is what the user asked for (dsjax logs the restore itself)."""
    notice = _ReadOnlyNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
