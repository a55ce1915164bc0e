"""FLOPs model, MFU, and the metrics.jsonl sink.

FLOPs per token follow PaLM (appendix B), as nanoGPT's `estimate_mfu` codes it:
    6 N + 12 L H Q T
with N the parameters that take part in matmuls (the embedding gather table excluded unless tied to the
LM head), L layers, H heads, Q head dim, T sequence length. The second term counts the full attention
score matrix; the causal count halves it (6 L H Q T), as MaxText now reports. `mfu` uses the PaLM count,
`mfu_causal` the causal one. Remat recomputation is never counted (that would be HFU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
