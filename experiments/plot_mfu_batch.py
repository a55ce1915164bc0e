"""Plot MFU against global batch size, one line per preset, from bench_train.py JSON lines.

Usage: python experiments/plot_mfu_batch.py RESULTS.jsonl [...] --out=experiments/mfu_vs_batch.png

Uses the rows of single-device runs with bf16 compute and no config overrides other than the batch size and
the precision policy, errorless, and run with no XLA flag beyond those dsjax sets (a name and value of
dsjax.xla_flags.FLAGS); when a batch appears more than once, the median MFU is plotted.
Needs matplotlib (not a dsjax dependency).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import jax.numpy as jnp
import matplotlib.pyplot as plt

from dsjax import xla_flags
from dsjax.config import ConfigError
from dsjax.precision import parse_policy


def bf16_compute(policy: str | None) -> bool:
    """Whether `policy` (a precision.policy string) computes in bf16; False for a missing or unknown one."""
    if not isinstance(policy, str):
        return False
    try:
        return parse_policy(policy).compute == jnp.bfloat16
    except ConfigError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="experiments/mfu_vs_batch.png")
    args = parser.parse_args()
    points: dict[str, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    devices = set()
    dsjax_flags = {f"{name}={value}" for flags in xla_flags.FLAGS.values() for name, value in flags.items()}
    for path in args.results:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        for r in rows:
            extra = set(r.get("overrides", {})) - {"train.batch_size", "precision.policy"}
            foreign = set(re.findall(r"--(\w+=\S*)", r.get("xla_flags", ""))) - dsjax_flags
            if r.get("error") or r.get("n_devices") != 1 or extra or foreign or not bf16_compute(r.get("precision")):
                continue
            points[f"{r['preset']} (T={r['seq_len']})"][r["batch"]].append(100 * r["mfu"])
            devices.add(r["device"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, by_batch in sorted(points.items()):
        batches = sorted(by_batch)
        mfu = [statistics.median(by_batch[b]) for b in batches]
        ax.plot(batches, mfu, marker="o", label=label)
        for b, m in zip(batches, mfu, strict=True):
            ax.annotate(f"{m:.1f}", (b, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("global batch size (sequences)")
    ax.set_ylabel("MFU, % of 989 TFLOP/s (PaLM count)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"dsjax train step, bf16 compute, one {' / '.join(sorted(devices))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
