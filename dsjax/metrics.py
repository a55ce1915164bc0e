"""FLOPs model, MFU, the metrics.jsonl schema and its sink.

FLOPs per token follow PaLM (appendix B), as nanoGPT's `estimate_mfu` codes it:
    6 N + 12 L H Q T
with N the parameters that take part in matmuls (the embedding gather table excluded unless tied to the
LM head), L layers, H heads, Q head dim, T sequence length. The second term counts the full attention
score matrix; the causal count halves it (6 L H Q T), as MaxText now reports. `mfu` uses the PaLM count,
`mfu_causal` the causal one. Remat recomputation is never counted (that would be HFU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from dsjax.config import ModelConfig

# Dense peak FLOP/s per device, by compute dtype; the first `device_kind` substring that matches wins.
# float32 matmuls run as TF32 on these GPUs, so fp32 counts against the TF32 peak.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v4", {"bfloat16": 275e12}),
]


def flops_per_token(cfg: ModelConfig, n_matmul_params: int, seq_len: int) -> tuple[float, float]:
    """(PaLM count, causal count) of training FLOPs per token (forward + backward)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * n_matmul_params + attention, 6 * n_matmul_params + attention / 2


def peak_flops(device: jax.Device, dtype: str = "float32") -> float | None:
    """The device's dense peak for `dtype`, or None where it is unknown (CPUs)."""
    for fragment, peaks in PEAK_FLOPS:
        if fragment.lower() in device.device_kind.lower():
            return peaks.get(dtype)
    return None


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of metrics.jsonl: its JSON type(s), unit and meaning, and the Prometheus gauge that exports
    it (`dsjax_<prom>`, labels run, process, device), or prom="" for keys not exported."""

    key: str
    types: tuple[type, ...]
    unit: str
    help: str
    prom: str = ""
    # A value measured per device (exported once per device, label "gpu<N>" / the JAX device id): how the
    # devices' values fold into the record's one value (the device="all" series); None if not per device.
    per_device: Callable[[list], Any] | None = None


_NUM = (int, float)
# Every key a metrics.jsonl record may hold. A training record (every train.log_every steps) has the step
# metrics and the throughput/goodput/memory/GPU keys; an evaluation record {"step", "eval_loss"}; the
# event records ("restored_from", "rollback_to", "advice", "profile") say what happened at that step.
# JSON null stands for a value that is not finite (a skipped step's loss) or not known (MFU on a CPU).
SCHEMA: tuple[Field, ...] = (
    Field("step", (int,), "steps", "optimizer steps finished (1-based)", "step"),
    Field("loss", _NUM, "nats/token", "training loss of the step", "loss"),
    Field("eval_loss", _NUM, "nats/token", "mean loss over train.eval_batches held-out batches", "eval_loss"),
    Field("grad_norm", _NUM, "", "global L2 norm of the unscaled gradients", "grad_norm"),
    Field("param_norm", _NUM, "", "global L2 norm of the parameters after the step", "param_norm"),
    Field(
        "update_norm", _NUM, "", "L2 norm of the change the step made to the parameters (0 if skipped)", "update_norm"
    ),
    Field("lr", _NUM, "", "learning rate of the step's update", "learning_rate"),
    Field("loss_scale", _NUM, "", "loss scale the step used (1 without loss scaling)", "loss_scale"),
    Field("skipped_steps", (int,), "steps", "steps skipped for non-finite gradients so far", "skipped_steps"),
    Field("consecutive_skips", (int,), "steps", "skipped steps in a row up to this one", "consecutive_skips"),
    Field(
        "tokens_per_sec", _NUM, "tokens/s", "training tokens per second over the last log window", "tokens_per_second"
    ),
    Field("step_time_s", _NUM, "s", "mean step time over the last log window", "step_time_seconds"),
    Field("mfu", _NUM, "fraction", "model FLOPs utilisation, PaLM count (null where the peak is unknown)", "mfu"),
    Field("mfu_causal", _NUM, "fraction", "MFU with the causal attention count", "mfu_causal"),
    Field(
        "memory_in_use_bytes",
        (int,),
        "bytes",
        "device memory in use (largest over local devices)",
        "memory_in_use_bytes",
        per_device=max,
    ),
    Field(
        "memory_peak_bytes",
        (int,),
        "bytes",
        "peak device memory in use so far (largest over local devices)",
        "memory_peak_bytes",
        per_device=max,
    ),
    Field(
        "memory_limit_bytes",
        (int,),
        "bytes",
        "device memory the allocator may use",
        "memory_limit_bytes",
        per_device=max,
    ),
    Field("wall_s", _NUM, "s", "wall time since the run started (this process)", "wall_seconds"),
    Field("goodput", _NUM, "fraction", "productive_s / wall_s", "goodput"),
    Field(
        "productive_s",
        _NUM,
        "s",
        "wall time not lost to setup, compile, checkpoint, data_wait, eval or restart",
        "productive_seconds",
    ),
    Field("setup_s", _NUM, "s", "building the mesh, model and state before the first step", "setup_seconds"),
    Field("compile_s", _NUM, "s", "compiling XLA programs on the training thread", "compile_seconds"),
    Field("checkpoint_s", _NUM, "s", "the training loop waiting on checkpoint saves", "checkpoint_seconds"),
    Field(
        "data_wait_s",
        _NUM,
        "s",
        "the host building batches while the device had no step left to run",
        "data_wait_seconds",
    ),
    Field("eval_s", _NUM, "s", "evaluating", "eval_seconds"),
    Field(
        "restart_s",
        _NUM,
        "s",
        "restoring a checkpoint and repeating steps an earlier attempt had run",
        "restart_seconds",
    ),
    Field(
        "gpu_utilization_pct",
        _NUM,
        "%",
        "NVML GPU utilisation (mean over local GPUs)",
        "gpu_utilization_percent",
        per_device=statistics.fmean,
    ),
    Field(
        "gpu_memory_used_bytes",
        (int,),
        "bytes",
        "NVML memory used (largest over local GPUs)",
        "gpu_memory_used_bytes",
        per_device=max,
    ),
    Field(
        "gpu_temperature_c",
        _NUM,
        "°C",
        "NVML GPU temperature (hottest local GPU)",
        "gpu_temperature_celsius",
        per_device=max,
    ),
    Field("gpu_power_w", _NUM, "W", "NVML power draw (sum over local GPUs)", "gpu_power_watts", per_device=sum),
    Field(
        "gpu_sm_clock_mhz",
        _NUM,
        "MHz",
        "NVML SM clock (mean over local GPUs)",
        "gpu_sm_clock_mhz",
        per_device=statistics.fmean,
    ),
    Field("restored_from", (str,), "", "event: the run resumed from this checkpoint"),
    Field("rollback_to", (int,), "steps", "event: a non-finite step rolled the run back to this step"),
    Field("skipped_batches", (list,), "", "event: global batch indices left out after the rollback"),
    Field("reason", (str,), "", "event: why the rollback happened"),
    Field("advice", (str,), "", "event: the advisor rule that fired (also dsjax_advice{rule=...} = 1)"),
    Field("message", (str,), "", "event: the advice, in words"),
    Field("profile", (str,), "", "event: a jax.profiler trace of profile.steps was written to this directory"),
)
FIELDS: dict[str, Field] = {f.key: f for f in SCHEMA}


def is_number(value) -> bool:
    """An int or float and not a bool (JSON true/false are not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite_number(value) -> float | None:
    """`value` as a float if it is a finite real number; None for JSON null, NaN / inf (a skipped step's
    loss in a run's in-memory history), bools and anything else: the values a plot or a scalar log skips."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def check_record(record: dict) -> None:
    """Raise ValueError naming the key if `record` does not follow SCHEMA (tests and dsjax.report)."""
    if "step" not in record:
        raise ValueError(f"metrics record without a step: {record}")
    for key, value in record.items():
        if key not in FIELDS:
            raise ValueError(f"metrics key {key!r} is not in dsjax.metrics.SCHEMA")
        types = FIELDS[key].types
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise ValueError(f"metrics key {key!r} holds {value!r}; expected {' or '.join(t.__name__ for t in types)}")


class MetricsLog:
    """Appends one JSON object per line to `path` and flushes, so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        # JSON has no NaN or infinity: a non-finite value (a skipped step's loss) is written as null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
