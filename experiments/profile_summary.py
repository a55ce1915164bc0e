"""Summarise a `jax.profiler` trace: where the device time of a train step goes.

Usage: python experiments/profile_summary.py TRACE_DIR [--steps=N] [--top=K]

Reads the Perfetto trace (`perfetto_trace.json.gz`, written by `jax.profiler.trace(...,
create_perfetto_trace=True)`) found under TRACE_DIR, keeps the events on one GPU's streams (--gpu, the
first by default; in a pipeline GPU k runs stage k) and
prints, per step (total / N): the busy time of the streams, the time the device sat idle between the
first and the last kernel, the time per kernel category, the top-K kernels by total time, and the K
longest idle gaps with the kernels on either side (whether the idle time sits between steps or inside one).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

CATEGORIES = (  # first match wins; names as CUDA reports them
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    ("collective (NCCL)", re.compile(r"nccl", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|sm90|sm100|wgmma|triton_.*dot|__triton_gemm", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction fusion", re.compile(r"reduce|reduction", re.I)),
    ("scatter / gather", re.compile(r"scatter|gather|dynamic_update_slice|dynamic_slice", re.I)),
    ("elementwise / other fusion", re.compile(r"fusion|triton|loop|input|convert|select|add|multiply", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def find_trace(root: Path) -> Path:
    traces = sorted(root.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        sys.exit(f"no perfetto_trace.json.gz under {root}; trace with create_perfetto_trace=True")
    return traces[-1]


def device_events(trace: dict, gpu_index: int = 0) -> list[dict]:
    """Complete ('X') events on the streams of one GPU (pid named '/device:GPU:<gpu_index>...')."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [pid for pid, name in names.items() if re.search(rf"/device:GPU:{gpu_index}\b", name)]
    if not gpu:
        sys.exit(f"no '/device:GPU:{gpu_index}' process in the trace; processes: {sorted(set(names.values()))}")
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and e.get("dur", 0) > 0]


def summarise(trace_dir: str | Path, steps: int, top: int = 25, gpu_index: int = 0) -> dict:
    path = find_trace(Path(trace_dir))
    with gzip.open(path, "rt") as f:
        events = device_events(json.load(f), gpu_index)
    # Stream-level events (e.g. an XLA module span) enclose kernels; keep the innermost kernel events by
    # dropping any event that contains another on the same thread.
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    kernels = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        for i, e in enumerate(evs):
            nxt = evs[i + 1] if i + 1 < len(evs) else None
            if nxt is not None and nxt["ts"] < e["ts"] + e["dur"] and nxt["ts"] + nxt["dur"] <= e["ts"] + e["dur"]:
                continue  # e encloses the next event: a span, not a kernel
            kernels.append(e)
    if not kernels:
        sys.exit(f"no device kernels in {path}")
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    # Busy time: the union of kernel intervals over all streams (overlapping streams counted once).
    # The gaps: stretches of the span where no stream runs a kernel, each with the kernels around it.
    busy, cursor, last, gaps = 0.0, start, None, []
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if e["ts"] > cursor and last is not None:
            gaps.append((e["ts"] - cursor, last["name"], e["name"]))
        lo, hi = max(e["ts"], cursor), e["ts"] + e["dur"]
        if hi > lo:
            busy += hi - lo
            cursor, last = hi, e
    per_cat, per_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        per_cat[category(e["name"])] += e["dur"]
        per_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    ms = 1e-3 / steps  # trace times are microseconds
    return {
        "trace": str(path),
        "gpu": gpu_index,
        "steps": steps,
        "span_ms_per_step": round((end - start) * ms, 2),
        "busy_ms_per_step": round(busy * ms, 2),
        "idle_ms_per_step": round((end - start - busy) * ms, 2),
        "kernel_ms_per_step": round(sum(per_cat.values()) * ms, 2),
        "categories_ms_per_step": {k: round(v * ms, 2) for k, v in per_cat.most_common()},
        "top_kernels": [
            {"name": n[:160], "ms_per_step": round(v * ms, 3), "calls_per_step": round(count[n] / steps, 1)}
            for n, v in per_name.most_common(top)
        ],
        "gaps_over_10us_per_step": round(sum(g for g, _, _ in gaps if g > 10) * ms, 2),
        "largest_gaps": [
            {"us": round(g, 1), "after": a[:100], "before": b[:100]} for g, a, b in sorted(gaps, reverse=True)[:top]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--steps", type=int, default=1, help="train steps inside the trace (times are divided by it)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gpu", type=int, default=0, help="which GPU's streams to read (GPU k runs pipeline stage k)")
    args = parser.parse_args()
    print(json.dumps(summarise(args.trace_dir, args.steps, args.top, args.gpu), indent=1))


if __name__ == "__main__":
    main()
