"""The GPU's SM clock and power while a benchmark runs, sampled by `nvidia-smi` (experiments only).

    with Sampler() as sampler:   # runs `nvidia-smi -lms 50` on the first visible GPU (nothing without nvidia-smi)
        sampler.mark("windows")  # phases, on the host's clock
        ...
        sampler.mark("end")
        sampler.summary()        # {"windows": {"samples", "sm_mhz_median", "sm_mhz_min", "power_w_median"}}

Why: these H200s hold training at their 700 W power limit, where the SM clock falls well below its 1980 MHz
maximum and differs between machines (experiments/RESULTS.md, thirteenth session). A step time is read with
the clock and power it ran at. `power.draw` is the driver's power reading, which recent drivers average over
about a second: phases shorter than that read the power of the phase before.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
import weakref
from datetime import datetime


def first_visible_gpu() -> str:
    """The GPU that jax numbers 0, as nvidia-smi -i takes it: the first entry of CUDA_VISIBLE_DEVICES (an index
    or a UUID), else "0". nvidia-smi itself ignores CUDA_VISIBLE_DEVICES. CUDA numbers GPUs fastest first and
    nvidia-smi in PCI order; the two agree on machines of identical GPUs (else set CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"


class Sampler:
    def __init__(self, gpu: int | str | None = None, every_ms: int = 50):
        self.proc, self.marks, self.path = None, [], None
        gpu = first_visible_gpu() if gpu is None else gpu
        if shutil.which("nvidia-smi"):
            fd, self.path = tempfile.mkstemp(suffix=".csv")
            query = "--query-gpu=timestamp,clocks.sm,power.draw"
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(gpu), query, "--format=csv,noheader,nounits", "-lms", str(every_ms)],
                stdout=fd,
                stderr=subprocess.DEVNULL,
            )
            os.close(fd)
            self._finalizer = weakref.finalize(self, _stop, self.proc, self.path)  # also on errors and at exit

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop nvidia-smi and remove its file (summary() does this too)."""
        if self.proc is not None:
            self._finalizer()
            self.proc = None

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def _samples(self) -> list[tuple[float, float, float]]:
        samples = []
        with open(self.path) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                try:
                    t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    samples.append((t, float(parts[1]), float(parts[2])))
                except (ValueError, IndexError):
                    continue
        return samples

    def summary(self) -> dict:
        """Per phase (from each mark to the next): the samples' count, median and lowest SM clock (MHz) and
        median power (W). Stops the sampler; {} without nvidia-smi."""
        if self.proc is None:
            return {}
        self.proc.terminate()
        self.proc.wait()
        samples = self._samples()
        self.close()
        out = {}
        for (name, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            inside = [(c, p) for t, c, p in samples if start <= t < end]
            if inside:
                out[name] = {
                    "samples": len(inside),
                    "sm_mhz_median": statistics.median(c for c, _ in inside),
                    "sm_mhz_min": min(c for c, _ in inside),
                    "power_w_median": statistics.median(p for _, p in inside),
                }
        return out


def _stop(proc: subprocess.Popen, path: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait()
    if os.path.exists(path):
        os.unlink(path)
