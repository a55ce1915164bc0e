"""Overhead of the monitoring sinks together: step time with every sink on vs none, in one process.

    PYTHONPATH=. python experiments/bench_monitor.py --preset=gpt2-124m [--steps=60] [--rounds=3]
    PYTHONPATH=. python experiments/bench_monitor.py --preset=tiny --cpu-devices=1      (CPU)

One run is built and compiled once; then `--rounds` pairs of segments of `--steps` steps each train it
further, alternating "off" (no run directory: no metrics.jsonl, no TensorBoard, no Prometheus, no NVML,
no advisor) and "on" (metrics.jsonl, TensorBoard files, the Prometheus endpoint scraped every second by
a thread here, NVML sampled every 2 s, the advisor). Both log every 10 steps, so both read the metrics
back and compute memory statistics and goodput at the same points; what differs is what the sinks do
with the record. The figure is the median window step time of each mode (the first window of each
segment left out: it holds the pipeline fill), and the overhead is on / off - 1.

Prints one JSON line; --json=PATH also appends it there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--steps", type=int, default=60, help="steps per segment")
    parser.add_argument("--rounds", type=int, default=3, help="(off, on) segment pairs")
    parser.add_argument("--batch-size", type=int, default=0, help="override the preset's batch (0: keep it)")
    parser.add_argument("--cpu-devices", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    if args.cpu_devices:
        from dsjax.mesh import simulate_cpu_devices

        simulate_cpu_devices(args.cpu_devices)
    import jax

    from dsjax import xla_flags
    from dsjax.config import CheckpointConfig, MonitorConfig, preset
    from dsjax.monitor import Monitor
    from dsjax.train import build, fit, prepare

    xla_flags.apply()
    base = preset(args.preset)
    train = dataclasses.replace(
        base.train, log_every=10, eval_every=0, eval_batches=1, sample_tokens=0, steps=args.steps
    )
    if args.batch_size:
        train = dataclasses.replace(train, batch_size=args.batch_size)
    base = base.replace(train=train, checkpoint=CheckpointConfig(enabled=False))
    run = build(base)
    compiled = prepare(run, log=lambda _: None)
    quiet = lambda _: None  # noqa: E731
    port = _free_port()
    modes = {
        "off": MonitorConfig(tensorboard=False, gpu_stats=False, advisor=False),
        "on": MonitorConfig(prometheus_port=port, gpu_every_s=2.0),
    }
    times: dict[str, list[float]] = {"off": [], "on": []}
    scrapes = [0]
    with tempfile.TemporaryDirectory() as tmp:
        done = 0
        for round_ in range(args.rounds):
            for mode, monitor_config in modes.items():
                done += args.steps
                run.config = base.replace(train=dataclasses.replace(train, steps=done), monitor=monitor_config)
                out = None
                if mode == "on":
                    out = Path(tmp) / f"on{round_}"
                    out.mkdir()
                stop = threading.Event()
                with Monitor(run.config, "bench", quiet) as monitor:
                    monitor.attach(out)
                    scraper = threading.Thread(target=_scrape, args=(port, stop, scrapes), daemon=True)
                    if mode == "on":
                        scraper.start()
                    history = fit(run, out, progress=False, log=quiet, compiled=compiled, monitor=monitor)
                    stop.set()
                    if mode == "on":
                        scraper.join()
                times[mode] += [r["step_time_s"] for r in history if "step_time_s" in r][1:]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    result = {
        "bench": "monitor_overhead",
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": train.batch_size,
        "seq_len": train.seq_len,
        "steps_per_segment": args.steps,
        "rounds": args.rounds,
        "windows": {k: len(v) for k, v in times.items()},
        "step_time_off_s": off,
        "step_time_on_s": on,
        "overhead": on / off - 1,
        "scrapes": scrapes[0],
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            count[0] += 1


if __name__ == "__main__":
    sys.exit(main())
