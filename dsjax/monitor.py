"""What a training run reports about itself, besides the loss: goodput, memory, GPU health, advice.

`Monitor` is what `dsjax.train.fit` talks to. At every log step it completes the step's record with the
device memory in use (JAX's allocator statistics), the goodput breakdown (`Goodput`) and the GPU health
samples (`GpuStats`, NVML), lets the `Advisor` look at it, and writes it to every sink: metrics.jsonl
(process 0), TensorBoard event files in <out>/tensorboard (process 0) and a Prometheus endpoint (every
process). The keys, units and exported gauge names are the table `dsjax.metrics.SCHEMA`. `ProfileWindow`
wraps profile.steps in a jax.profiler trace.

Goodput follows the usual definition (productive training time / wall time) with the lost time split by
cause, each measured on the training thread: setup (mesh, model, state), compile (JAX's own compile-time
events, so recompiles anywhere count), checkpoint (the loop blocked on a save), data_wait (the host
building batches while the device has no step left to run), eval, restart (restoring a checkpoint, and
the share of step time spent on steps an earlier attempt had already run). productive_s is the rest of
the wall time.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax

from dsjax import distributed
from dsjax.advisor import Advisor
from dsjax.config import Config, ConfigError
from dsjax.metrics import FIELDS, SCHEMA, MetricsLog, finite_number, is_number

LOST = ("setup", "compile", "checkpoint", "data_wait", "eval", "restart")
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_clocks: weakref.WeakSet[Goodput] = weakref.WeakSet()  # live clocks, fed by one process-wide compile listener
_listening = False


def _on_duration(event: str, duration: float, **_kwargs) -> None:
    if event in _COMPILE_EVENTS:
        for clock in list(_clocks):
            if threading.get_ident() == clock.thread:  # a background compile costs the loop no time
                clock.compiled += duration


class Goodput:
    """Wall time since `start` (time.perf_counter), split into the LOST causes and productive time."""

    def __init__(self, start: float | None = None):
        global _listening
        self.start = time.perf_counter() if start is None else start
        self.thread = threading.get_ident()
        self.compiled = 0.0  # compile seconds on this thread, from JAX's events
        self.lost = dict.fromkeys(LOST, 0.0)
        self.setup_done = False
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
        _clocks.add(self)

    @contextlib.contextmanager
    def timed(self, cause: str) -> Iterator[None]:
        """Count the time inside as `cause`, less any compiling done inside (counted as compile)."""
        t0, c0 = time.perf_counter(), self.compiled
        try:
            yield
        finally:
            self.lost[cause] += max(0.0, time.perf_counter() - t0 - (self.compiled - c0))

    def timed_iter(self, items: Iterator, cause: str, idle: Callable[[], bool]) -> Iterator:
        """`items`, with the time spent producing each counted as `cause` when `idle()` said, before it,
        that the device had nothing left to run (host time while queued steps run costs nothing)."""
        done = object()
        while True:
            if idle():
                with self.timed(cause):
                    item = next(items, done)
            else:
                item = next(items, done)
            if item is done:
                return
            yield item

    def add(self, cause: str, seconds: float) -> None:
        self.lost[cause] += seconds

    def end_setup(self) -> None:
        """The first step is about to run: what was not counted since `start` was setup."""
        if not self.setup_done:
            self.lost["setup"] = max(0.0, self.wall() - self.compiled - sum(self.lost.values()))
            self.setup_done = True

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def snapshot(self) -> dict[str, float]:
        wall = self.wall()
        lost = {**self.lost, "compile": self.compiled}
        productive = max(0.0, wall - sum(lost.values()))
        return {
            "wall_s": wall,
            "goodput": productive / wall if wall > 0 else 0.0,
            "productive_s": productive,
            **{f"{cause}_s": seconds for cause, seconds in lost.items()},
        }

    def close(self) -> None:
        _clocks.discard(self)


def memory_stats(devices: Sequence[jax.Device]) -> dict[str, dict[str, int]]:
    """{device id: {memory_in_use_bytes, memory_peak_bytes, memory_limit_bytes}} from the allocator's
    statistics; empty where the backend keeps none (CPU)."""
    keys = {
        "bytes_in_use": "memory_in_use_bytes",
        "peak_bytes_in_use": "memory_peak_bytes",
        "bytes_limit": "memory_limit_bytes",
    }
    out = {}
    for device in devices:
        stats = device.memory_stats() or {}
        found = {ours: int(stats[theirs]) for theirs, ours in keys.items() if theirs in stats}
        if found:
            out[f"{device.platform}:{device.id}"] = found
    return out


_said_unavailable = False


def _unavailable(log: Callable[[str], None], reason: str) -> None:
    """Say once per process (a notebook trains many times) that there are no GPU stats, and why."""
    global _said_unavailable
    if not _said_unavailable:
        _said_unavailable = True
        log(f"GPU stats unavailable ({reason}); training goes on without them (monitor.gpu_stats=false hides this).")


class GpuStats:
    """NVML samples (utilisation, memory, temperature, power, SM clock) of the given GPUs, taken every
    `every_s` seconds by a background thread; `take()` hands out the mean of the samples since the last
    call, reading the GPUs once itself when a GPU has none since (a log window shorter than every_s), so a
    record never repeats an older window's figures (say, those of the compilation). `nvml` is the pynvml
    module (nvidia-ml-py) or a stand-in with its functions (tests).

    NVML numbers GPUs in PCI bus order and CUDA by default fastest first; on the usual nodes of identical
    GPUs the two agree. With CUDA_DEVICE_ORDER=FASTEST_FIRST on mixed GPUs they may not."""

    def __init__(self, indices: Sequence[int] | None, every_s: float, log: Callable[[str], None], nvml=None):
        self.available, self._samples, self._last = False, collections.defaultdict(list), {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.nvml, started = nvml, False
        try:
            if self.nvml is None:
                self.nvml = importlib.import_module("pynvml")
            self.nvml.nvmlInit()
            started = True
            count = self.nvml.nvmlDeviceGetCount()
            self.indices = list(range(count)) if indices is None else [i for i in indices if i < count]
            self.handles = {i: self.nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
            self._sample()  # fail here, once, rather than in the thread
        except Exception as err:  # no NVML library, no driver, no GPU: the run goes on without GPU stats
            if started:
                with contextlib.suppress(Exception):
                    self.nvml.nvmlShutdown()
            _unavailable(log, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            return
        self.take()  # that sample saw the GPUs before training: only the fallback until the thread's first
        if not self.handles:
            self.nvml.nvmlShutdown()
            _unavailable(log, "NVML sees none of this process's GPUs")
            return
        self.available = True
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="dsjax-nvml", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        nv = self.nvml
        for index, handle in self.handles.items():
            sample = {
                "gpu_utilization_pct": float(nv.nvmlDeviceGetUtilizationRates(handle).gpu),
                "gpu_memory_used_bytes": int(nv.nvmlDeviceGetMemoryInfo(handle).used),
                "gpu_temperature_c": float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
                "gpu_power_w": nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports milliwatts
                "gpu_sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)),
            }
            with self._lock:
                self._samples[index].append(sample)

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._sample()
            except Exception:  # a transient NVML error: skip this sample
                continue

    def take(self) -> dict[str, dict[str, float]]:
        """{"gpu<N>": mean of each stat over the samples since the last take} (empty if unavailable)."""
        with self._lock:  # every GPU must have a reading (the thread may be halfway through its GPUs)
            stale = self.available and not all(self._samples.get(index) for index in self.handles)
        if stale:
            with contextlib.suppress(Exception):  # an NVML error: the last means again
                self._sample()
        with self._lock:
            samples, self._samples = self._samples, collections.defaultdict(list)
        for index, rows in samples.items():
            means = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
            self._last[f"gpu{index}"] = {**means, "gpu_memory_used_bytes": int(means["gpu_memory_used_bytes"])}
        return dict(self._last)

    def close(self) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.available = False
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()


def aggregate(per_device: dict[str, dict[str, float]]) -> dict[str, float]:
    """The record's value of each per-device key, folded as its SCHEMA field says."""
    keys = {k for values in per_device.values() for k in values}
    return {k: FIELDS[k].per_device([v[k] for v in per_device.values() if k in v]) for k in sorted(keys)}


def nvml_indices(devices: Sequence[jax.Device]) -> list[int] | None:
    """NVML indices of this process's GPUs (CUDA_VISIBLE_DEVICES renumbers them), or None if not GPUs."""
    gpus = [d for d in devices if d.platform == "gpu"]
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    mapping = [int(v) for v in visible.split(",")] if visible and all(v.isdigit() for v in visible.split(",")) else None
    ids = [getattr(d, "local_hardware_id", d.id) for d in gpus]
    return [mapping[i] if mapping is not None and i < len(mapping) else i for i in ids]


class PrometheusSink:
    """Every SCHEMA field with a Prometheus name as a gauge `dsjax_<name>{run, process, device}` and
    `dsjax_advice{run, process, device, rule}`, served over HTTP by prometheus-client."""

    def __init__(self, host: str, port: int, local_rank: int, run: str, process: int):
        import prometheus_client as prom

        serve = port + local_rank  # several processes on one host: one port each
        where = f"monitor.prometheus_host={host!r}, monitor.prometheus_port={port}" + (
            f" + local rank {local_rank} = {serve}" if local_rank else ""
        )
        if serve > 65535:
            raise ConfigError(f"{where}: past the last TCP port, 65535. Choose a lower monitor.prometheus_port.")

        self.registry = prom.CollectorRegistry()
        self.labels = {"run": run, "process": str(process)}
        names = ("run", "process", "device")
        self.gauges = {
            f.key: prom.Gauge(
                f"dsjax_{f.prom}", f.help + (f" ({f.unit})" if f.unit else ""), names, registry=self.registry
            )
            for f in SCHEMA
            if f.prom
        }
        self.advice = prom.Gauge(
            "dsjax_advice", "1 while an advisor rule fires", (*names, "rule"), registry=self.registry
        )
        try:
            self.server, self.thread = prom.start_http_server(serve, addr=host, registry=self.registry)
        except OSError as err:
            why = {
                errno.EADDRINUSE: "another process holds that port; choose a free one",
                errno.EACCES: "ports below 1024 need privileges; choose a higher one",
            }.get(err.errno, "check that the host is an address of this machine")
            raise ConfigError(
                f"{where}: cannot serve metrics on {host}:{serve} ({err.strerror or err}): {why}, or set "
                "monitor.prometheus_port=0 to turn the exporter off."
            ) from None
        self.address = f"http://{host}:{self.server.server_port}/metrics"

    def write(self, record: dict, per_device: dict[str, dict[str, float]]) -> None:
        for key, value in record.items():
            gauge = self.gauges.get(key)
            if gauge is not None and is_number(value):
                gauge.labels(**self.labels, device="all").set(value)
        for device, values in per_device.items():
            for key, value in values.items():
                if FIELDS[key].per_device is not None:
                    self.gauges[key].labels(**self.labels, device=device).set(value)

    def set_advice(self, rule: str, active: bool) -> None:
        self.advice.labels(**self.labels, device="all", rule=rule).set(1 if active else 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class TensorBoardSink:
    """Scalars of every record in <out>/tensorboard (tensorboardX), tagged by their metrics.jsonl key."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(directory), flush_secs=30)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and (number := finite_number(value)) is not None:
                self.writer.add_scalar(key, number, step)  # a skipped step's NaN loss is left out, as in metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class ProfileWindow:
    """A jax.profiler trace from the dispatch of step START to the end of step END (1-based)."""

    def __init__(self, span: tuple[int, int] | None, directory: Path | None):
        self.span, self.directory, self.tracing, self.done = span, directory, False, False

    def check(self) -> None:
        """A ConfigError if a trace is asked for and there is no run directory to write it to."""
        if self.span and self.directory is None:
            raise ConfigError(
                f"profile.steps={self.span[0]}:{self.span[1]} writes a trace into the run directory; give the "
                "run one (--out, or the `out` argument of dsjax.train.fit / dsjax.train.train)."
            )

    def before(self, step: int) -> None:
        """Before dispatching 0-based `step`. One trace per run, even if a rollback runs the span again."""
        if self.span and not (self.tracing or self.done) and self.span[0] <= step + 1 <= self.span[1]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, state) -> Path | None:
        """After dispatching `step`; at END, waits for it and ends the trace. Returns the trace directory."""
        if not self.tracing or step + 1 < self.span[1]:
            return None
        jax.block_until_ready(state)
        return self.stop()

    def stop(self) -> Path | None:
        if not self.tracing:
            return None
        jax.profiler.stop_trace()
        self.tracing, self.done = False, True
        return self.directory


class Monitor:
    """The sinks and instruments of one run. `attach(out)` opens the files once the run directory exists;
    `write` sends an event or evaluation record to the sinks; `training` completes a training record
    (memory, goodput, GPU stats, advice) and sends it; `close` releases the port, the files, NVML."""

    def __init__(
        self,
        config: Config,
        run_name: str = "",
        log: Callable[[str], None] = print,
        goodput: Goodput | None = None,
        devices: Sequence[jax.Device] | None = None,
        nvml=None,
    ):
        m = config.monitor
        self.config, self.log = config, log
        self.goodput = goodput if goodput is not None else Goodput()
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.primary = distributed.is_primary()
        self.jsonl: MetricsLog | None = None
        self.tensorboard: TensorBoardSink | None = None
        self.profile = ProfileWindow(config.profile.span(), None)
        self.advisor = Advisor(config, self.devices[0].device_kind) if m.advisor else None
        self.redo_until = 0  # steps up to this one were run by an earlier attempt (restart time)
        self._productive = 0.0  # productive_s of the last training record
        self.prometheus, self.gpus = None, None
        if m.prometheus_port:  # the one step here that can fail, so it comes before the NVML thread starts
            self.prometheus = PrometheusSink(
                m.prometheus_host,
                m.prometheus_port,
                distributed.process_env().local_rank,
                m.run_name or run_name or "run",
                jax.process_index(),
            )
            log(f"prometheus: serving {self.prometheus.address}")
        indices = nvml_indices(self.devices)
        if m.gpu_stats and (indices is not None or nvml is not None):
            self.gpus = GpuStats(indices, m.gpu_every_s, log, nvml=nvml)
        elif m.gpu_stats:
            _unavailable(log, f"this run's devices are {self.devices[0].platform}, not NVIDIA GPUs")

    def attach(self, out: Path | None) -> None:
        """Open metrics.jsonl and the TensorBoard files in `out` (process 0) and aim the profiler there."""
        if out is None:
            return
        several = jax.process_count() > 1  # each process writes its own trace: one folder per process
        self.profile.directory = out / "profile" / (f"process{jax.process_index()}" if several else "")
        if not self.primary:
            return
        self.jsonl = MetricsLog(out / "metrics.jsonl")
        if self.config.monitor.tensorboard:
            self.tensorboard = TensorBoardSink(out / "tensorboard")

    def write(self, record: dict, per_device: dict | None = None) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.prometheus is not None:
            self.prometheus.write(record, per_device or {})

    def training(self, record: dict, window: tuple[int, int]) -> list[dict]:
        """Complete a training record (log step) and write it; returns it with the advice records after it.
        Steps window[0]..window[1] (1-based, inclusive) ran since the last one; the share of the productive
        time since then that went to steps an earlier attempt had run moves to restart."""
        repeated = max(0, min(window[1], self.redo_until) - window[0] + 1)
        if repeated:
            since = self.goodput.snapshot()["productive_s"] - self._productive
            self.goodput.add("restart", since * repeated / (window[1] - window[0] + 1))
        per_device = memory_stats(self.devices)
        if self.gpus is not None and self.gpus.available:
            per_device.update(self.gpus.take())
        full = {**record, **aggregate(per_device), **self.goodput.snapshot()}
        self._productive = full["productive_s"]
        self.write(full, per_device)
        records = [full]
        for rule, advice in self.advisor.observe(full) if self.advisor else []:
            if self.prometheus is not None:
                self.prometheus.set_advice(rule, advice is not None)
            if advice is not None:
                self.log(f"advice ({rule}): {advice}")
                event = {"step": record["step"], "advice": rule, "message": advice}
                self.write(event)
                records.append(event)
        return records

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Release everything, each even if another fails (the first error is raised after)."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.goodput.close)
            for sink in (self.jsonl, self.tensorboard, self.prometheus, self.gpus):
                if sink is not None:
                    stack.callback(sink.close)
            if self.profile.stop() is not None:
                self.log(f"profile: the run stopped inside profile.steps; partial trace in {self.profile.directory}")
