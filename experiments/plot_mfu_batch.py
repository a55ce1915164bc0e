"""Plot MFU against global batch size, one line per preset, from bench_train.py JSON lines.

Usage: python experiments/plot_mfu_batch.py RESULTS.jsonl [...] --out=experiments/mfu_vs_batch.png

Uses the bf16 rows of single-device runs without config overrides other than the batch size (the
presets' defaults) and errorless; when a batch appears more than once, the median MFU is plotted.
Needs matplotlib (not a dsjax dependency).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="experiments/mfu_vs_batch.png")
    args = parser.parse_args()
    points: dict[str, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    devices = set()
    for path in args.results:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        for r in rows:
            extra = set(r.get("overrides", {})) - {"train.batch_size", "precision.policy"}
            if r.get("error") or r.get("n_devices") != 1 or r.get("precision") != "bf16" or extra:
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
    ax.set_title(f"dsjax bf16 train step, one {' / '.join(sorted(devices))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
