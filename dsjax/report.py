"""Plots and a markdown summary of a run directory's metrics.jsonl.

    python -m dsjax.report RUN_DIR [--out=DIR]

writes loss.png, throughput.png, mfu.png, memory.png, loss_scale.png and summary.md into DIR (default
RUN_DIR/report/). A plot whose keys never hold a number (MFU and memory on a CPU run, say), or the loss scale
where it is 1 throughout (no loss scaling), is left out, and the summary says so. In a notebook,
`figures(load(run_dir))` -- or `figures(history)` with the records `dsjax.train.train` returns -- gives
matplotlib Figures, which display inline (after `%matplotlib inline`).

matplotlib is optional (the `notebook` extra): only `figures`, `write` and the CLI need it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from dsjax.metrics import FIELDS, check_record, finite_number
from dsjax.rundir import unwritable

GIB = 2**30
EVENTS = ("restored_from", "rollback_to", "advice", "profile")
MEMORY = ("memory_in_use_bytes", "memory_peak_bytes", "memory_limit_bytes", "gpu_memory_used_bytes")
# name -> (y label, [(key, legend label, scale)]); every key a plot draws is a metrics.jsonl key.
PLOTS = {
    "loss": ("loss (nats/token)", [("loss", "train", 1), ("eval_loss", "eval", 1)]),
    "throughput": ("tokens/s", [("tokens_per_sec", "training tokens/s", 1)]),
    "mfu": ("MFU (%)", [("mfu", "MFU (PaLM count)", 100), ("mfu_causal", "MFU (causal count)", 100)]),
    "memory": ("GiB", [(k, k.removesuffix("_bytes").replace("_", " "), 1 / GIB) for k in MEMORY]),
    "loss_scale": ("loss scale", [("loss_scale", "loss scale", 1)]),
}
BREAKDOWN = ("setup_s", "compile_s", "checkpoint_s", "data_wait_s", "eval_s", "restart_s", "productive_s")
CONFIG_LINES = {
    "model": ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"),
    "mesh": ("data", "pipeline", "fsdp", "tensor"),
    "precision": ("policy", "loss_scale"),
    "train": ("steps", "batch_size", "seq_len", "lr"),
}


class ReportError(ValueError):
    """A run directory or metrics file that cannot be reported on; the message says which and why."""


def _kind(record: dict) -> str:
    return next((k for k in EVENTS if k in record), "eval" if "eval_loss" in record else "train")


def latest(records: list[dict]) -> list[dict]:
    """`records` in step order, keeping only the last training and the last evaluation record of each step.

    A resumed (or rolled-back) run repeats the steps after its checkpoint, and the repeat is the one the final
    model went through. Events are all kept: two restarts from one checkpoint share a step, yet both happened.
    """
    kept: dict[tuple, tuple[int, dict]] = {}
    for i, record in enumerate(records):
        kind = _kind(record)
        kept[(record["step"], kind) if kind in ("train", "eval") else (i,)] = (i, record)
    return [r for _, r in sorted(kept.values(), key=lambda ir: (ir[1]["step"], ir[0]))]


def load(run_dir: str | Path, log: Callable[[str], None] = print) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, checked against dsjax.metrics.SCHEMA, repeats resolved by `latest`.

    A last line cut short (no newline, not valid JSON: the run is writing it, or stopped while it was) is left
    out, with a warning through `log`; any other bad line is a ReportError naming it."""
    run_dir = Path(run_dir)
    hint = "give the directory a run wrote with `python -m dsjax.train --out=DIR` (it holds metrics.jsonl)."
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}: {hint}")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} holds no metrics.jsonl (or the run stopped before logging anything): {hint}")
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte: that line is not valid JSON
        lines = f.readlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not line.endswith("\n"):
                log(f"warning: {path}, line {n}, the last, is cut short (no newline, not valid JSON): left out.")
                break
            raise ReportError(f"{path}, line {n}: not valid JSON ({err.msg} at column {err.colno}).") from None
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            # A key this version does not know comes from a newer dsjax: left out, so old tools still read it.
            record = {k: v for k, v in record.items() if k in FIELDS}
            check_record(record)
            if not isinstance(record["step"], int) or record["step"] < 0:  # check_record lets null through
                raise ValueError(f"its step is {record['step']!r}, not an integer >= 0")
        except ValueError as err:
            raise ReportError(f"{path}, line {n}: {err} (see dsjax.metrics.SCHEMA).") from None
        records.append(record)
    if not records:
        raise ReportError(f"{path} holds no records yet: the run has not logged its first step.")
    return latest(records)


def _series(records: list[dict], key: str, scale: float = 1) -> tuple[list[int], list[float]]:
    points = [(r["step"], finite_number(r.get(key))) for r in records if _kind(r) in ("train", "eval")]
    return [s for s, v in points if v is not None], [v * scale for _, v in points if v is not None]


def _skips(records: list[dict]) -> list[int]:
    """The log steps at which the count of skipped (non-finite) steps rose."""
    counts = [(r["step"], r["skipped_steps"]) for r in records if isinstance(r.get("skipped_steps"), int)]
    return [step for (_, before), (step, count) in itertools.pairwise([(None, 0), *counts]) if count > before]


def _present(records: list[dict]) -> list[str]:
    # Without loss scaling the scale is 1 throughout: a flat line that says nothing, unless steps were skipped.
    flat = set(_series(records, "loss_scale")[1]) <= {1.0} and not _skips(records)
    has = {name for name, (_, series) in PLOTS.items() if any(_series(records, k)[0] for k, _, _ in series)}
    return [name for name in PLOTS if name in has and not (name == "loss_scale" and flat)]


def _mark(ax, steps: list[int], label: str, **style) -> None:
    for i, step in enumerate(steps):
        ax.axvline(step, label=None if i else label, lw=1, **style)


def figures(records: list[dict]):
    """{plot name: matplotlib Figure} for the plots that have data; `records` from `load` or `train`'s history."""
    from matplotlib.figure import Figure  # here, not at the top: load and summary work without matplotlib

    records = latest(_checked(records))
    figs = {}
    for name in _present(records):
        ylabel, series = PLOTS[name]
        # Figure, not pyplot: no global figure registry to leak into, and no GUI backend is ever needed.
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        for key, label, scale in series:
            xs, ys = _series(records, key, scale)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 50 or key == "eval_loss" else None, ms=3)
        if name == "loss":
            _mark(ax, [r["step"] for r in records if "restored_from" in r], "restart", color="gray", ls="--")
            _mark(ax, [r["step"] for r in records if "rollback_to" in r], "rollback", color="red", ls=":")
        if name == "loss_scale":  # powers of two, halved on every skipped step: a log axis
            _mark(ax, _skips(records), "steps skipped", color="red", alpha=0.4)
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=ylabel, title=name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
        figs[name] = fig
    return figs


def _fmt(value: float | None, spec: str = ".4f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _median(values: list) -> float | None:
    values = [v for v in map(finite_number, values) if v is not None]
    return statistics.median(values) if values else None


def _gib(records: list[dict], *keys: str) -> str:
    return _fmt(max((v for k in keys for v in _series(records, k, 1 / GIB)[1]), default=None), ".2f", " GiB")


def _config(run_dir: str | Path | None) -> dict:
    path = Path(run_dir) / "config.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON ({err}); move it aside to report without it.") from None
    return config if isinstance(config, dict) else {}


def _checked(records) -> list[dict]:
    """`records` if it is a list of records with steps; else a ReportError that says what to pass."""
    if isinstance(records, str | Path):
        raise ReportError(f"pass the records, not a path: load({str(records)!r}) reads a run directory's records.")
    records = list(records)  # an iterator is read once
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in records):
        raise ReportError("every record must be a dict with an integer 'step' (from load(run_dir) or train's history).")
    return records


def summary(run_dir: str | Path | None, records: list[dict]) -> str:
    """summary.md's markdown for `records` (config.json read from `run_dir` when there is one; None: no config)."""
    records = latest(_checked(records))
    train = [r for r in records if _kind(r) == "train"]
    evals = [r for r in records if _kind(r) == "eval"]
    out, config = ["# dsjax run report", ""] + [f"- run: `{run_dir}`"] * (run_dir is not None), _config(run_dir)
    for section, keys in CONFIG_LINES.items():
        values = config.get(section)
        if isinstance(values, dict):
            out.append(f"- {section}: " + ", ".join(f"{k}={values[k]}" for k in keys if k in values))
    if records:
        span = f"{records[0]['step']} to {records[-1]['step']}"
        out.append(f"- steps: {span} ({len(train)} training records, {len(evals)} evaluations)")
    for label, key, rows in (("loss", "loss", train), ("eval loss", "eval_loss", evals)):
        steps, values = _series(rows, key)
        if steps:
            out.append(f"- {label}: {values[0]:.4f} (step {steps[0]}) -> {values[-1]:.4f} (step {steps[-1]})")
        # metrics.jsonl holds a NaN or infinite value as null: a key present without a finite number
        bad = [r["step"] for r in rows if key in r and finite_number(r[key]) is None]
        if bad:
            listed = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            out.append(f"- non-finite {label} (NaN or infinite) at {len(bad)} of {len(rows)} records: step {listed}")
    # The first window after the start and after each restart includes compiling: left out of the medians.
    starts = [-1] + [r["step"] for r in records if "restored_from" in r]
    warmup = {next((r["step"] for r in train if r["step"] > s), None) for s in starts}
    steady = [r for r in train if r["step"] not in warmup] or train
    tps, mfu, causal = (_median([r.get(k) for r in steady]) for k in ("tokens_per_sec", "mfu", "mfu_causal"))
    out.append(f"- median tokens/s (after the first window): {_fmt(tps, ',.0f')}")
    mfu_line = f"{_fmt(mfu and 100 * mfu, '.1f', '%')} (PaLM count), {_fmt(causal and 100 * causal, '.1f', '%')}"
    out.append(f"- median MFU (after the first window): {mfu_line} (causal count)")
    peak, limit = _gib(records, "memory_peak_bytes", "memory_in_use_bytes"), _gib(records, "memory_limit_bytes")
    gpu = _gib(records, "gpu_memory_used_bytes")
    out.append(f"- peak device memory: {peak} (limit {limit}; NVML GPU memory used: {gpu})")
    skipped = [r["skipped_steps"] for r in train if isinstance(r.get("skipped_steps"), int)]
    out.append(f"- skipped steps (non-finite gradients): {skipped[-1] if skipped else 'n/a'}")
    rollbacks = [r for r in records if "rollback_to" in r]
    out.append(f"- rollbacks: {len(rollbacks)}")
    out += [f"  - at step {r['step']}, back to step {r['rollback_to']}: {r.get('reason', '')}" for r in rollbacks]
    restarts = [r for r in records if "restored_from" in r]
    out.append(f"- restarts: {len(restarts)}")
    out += [f"  - resumed at step {r['step']} from `{r['restored_from']}`" for r in restarts]

    last = next((r for r in reversed(train) if finite_number(r.get("goodput")) is not None), None)
    if last is not None:
        wall = finite_number(last.get("wall_s"))
        note = "productive_s / wall_s of the last process; a restarted run's time before the restart is not in it"
        out += ["", "## Goodput", "", f"Goodput {last['goodput']:.1%} at step {last['step']} ({note}).", ""]
        out += ["| time | s | % of wall |", "|---|---:|---:|"]
        for key in (*BREAKDOWN, "wall_s"):
            value = finite_number(last.get(key))
            if value is not None:
                share = _fmt(wall and 100 * value / wall, ".1f", "%")
                out.append(f"| {key.removesuffix('_s')} | {value:.1f} | {share} |")
    advice = list(dict.fromkeys((r["advice"], r.get("message", "")) for r in records if "advice" in r))
    if advice:
        out += ["", "## Advice", ""] + [f"- **{rule}**: {message}" for rule, message in advice]

    present = _present(records)
    out += ["", "## Plots", ""] + [f"![{name}]({name}.png)" for name in present]
    flat = "1 throughout: no loss scaling" if _series(records, "loss_scale")[0] else "no data"
    missing = [f"{name} ({flat if name == 'loss_scale' else 'no data'})" for name in PLOTS if name not in present]
    if missing:
        out += ["", "Not plotted: " + ", ".join(missing) + "."]
    return "\n".join(out) + "\n"


def write(run_dir: str | Path, out: str | Path | None = None, records: list[dict] | None = None) -> Path:
    """Write the plots and summary.md into `out` (default RUN_DIR/report/); returns summary.md's path.

    `records`: RUN_DIR's, already loaded (read from metrics.jsonl when not given)."""
    records = load(run_dir) if records is None else records
    if out is not None and not str(out).strip():
        raise ReportError("--out is empty: name the directory to write the report into (default RUN_DIR/report).")
    out = Path(out).expanduser() if out is not None else Path(run_dir) / "report"
    why = unwritable(out)
    if why is not None:
        raise ReportError(f"the report's directory {out} {why}; give --out a directory you can write.")
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(records)
    for name in PLOTS:
        if name in figs:
            figs[name].savefig(out / f"{name}.png", dpi=100)
        else:  # an earlier report's plot would otherwise sit beside a summary that says there is none
            (out / f"{name}.png").unlink(missing_ok=True)
    path = out / "summary.md"
    path.write_text(summary(run_dir, records), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjax.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (and config.json)")
    parser.add_argument("--out", help="where to write the plots and summary.md (default RUN_DIR/report/)")
    args = parser.parse_args(argv)
    try:
        records = load(args.run_dir, log=lambda line: print(line, file=sys.stderr))  # needs no matplotlib
        import matplotlib

        matplotlib.use("Agg")  # files only: never pick a GUI backend from the environment
        path = write(args.run_dir, args.out, records)
    except ImportError as err:
        print(
            f"error: dsjax.report draws its plots with matplotlib, which could not be imported ({err}). Install it "
            "with `pip install matplotlib` (or the notebook extra, `pip install -e '.[notebook]'`) and run the "
            "report again.",
            file=sys.stderr,
        )
        return 2
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plots = [f"{name}.png" for name in PLOTS if (path.parent / f"{name}.png").exists()]  # write removed the rest
    print(f"wrote {path} and {', '.join(plots) or 'no plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
