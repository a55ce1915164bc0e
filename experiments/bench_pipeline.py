"""Pipeline benchmark: step time of each schedule at several microbatch counts, against one GPU.

Usage (from the repository root, on a machine with at least --stages GPUs):
    PYTHONPATH=. python experiments/bench_pipeline.py --preset=llama-1b --batch=8 --stages=2
        [--microbatches=2,4,8] [--schedules=gpipe,circular] [--repeats=2] [--out=results.jsonl]

Every configuration runs `experiments/bench_train.py` in its own process (same compiled step as
`python -m dsjax.train`): first the whole model on one GPU (CUDA_VISIBLE_DEVICES=0) at the same global
batch (in `--one-gpu-accum` microbatches where it does not fit at once), then `--stages` GPUs with
mesh.pipeline=stages (and no other parallelism) for each schedule and microbatch count. It prints one
table row per configuration with

    measured efficiency = T_1 / (P x T_P)

(the fraction of P GPUs' time the pipeline turns into the one-GPU work; 1 would be perfect) next to the
schedule's theoretical 1 - bubble (`dsjax.pipeline.Plan.bubble`: R M / (R M + P - 1) for GPipe and
circular, M / (M + P - 1) for 1F1B, whose P forward-only and P backward-only ticks cost P full ticks),
which ignores communication and the per-tick overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dsjax.pipeline import Plan

BENCH = Path(__file__).with_name("bench_train.py")


def measure(args: argparse.Namespace, sets: list[str], env: dict, out: Path) -> dict | None:
    before = out.read_text().splitlines() if out.exists() else []
    command = [sys.executable, str(BENCH), f"--preset={args.preset}", f"--batch={args.batch}", f"--out={out}"]
    command += [f"--warmup={args.warmup}", f"--steps={args.steps}", f"--windows={args.windows}"]
    command += [f"--set={s}" for s in sets]
    print("#", " ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, env=env, check=False)
    after = out.read_text().splitlines() if out.exists() else []
    if len(after) == len(before):
        return None
    result = json.loads(after[-1])
    if "error" in result:
        print(f"# failed: {result['error']}", file=sys.stderr, flush=True)
        return None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", default="2,4,8")
    parser.add_argument("--schedules", default="gpipe,circular")
    parser.add_argument("--repeats", type=int, default=2, help="chunks per stage for the circular schedule")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--out", default="/tmp/dsjax-bench-pipeline.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--one-gpu-ms", type=float, help="one-GPU step time measured earlier (skips that run)")
    parser.add_argument(
        "--one-gpu-accum",
        type=int,
        default=1,
        help="train.grad_accum of the one-GPU run, for a global batch one GPU cannot hold at once",
    )
    args = parser.parse_args()
    out = Path(args.out)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}

    one_ms, last = args.one_gpu_ms, None
    if not one_ms:
        sets = [*args.set, "mesh.fsdp=1", f"train.grad_accum={args.one_gpu_accum}"]
        last = measure(args, sets, {**base_env, "CUDA_VISIBLE_DEVICES": "0"}, out)
        if last is None:
            sys.exit("the one-GPU baseline failed; see the output above")
        one_ms = last["step_time_ms"]
    accum = f", grad_accum {args.one_gpu_accum}" if args.one_gpu_accum > 1 else ""
    rows = [(f"one GPU{accum}", 1, "-", one_ms, None, None)]
    P = args.stages
    for schedule in args.schedules.split(","):
        R = args.repeats if schedule == "circular" else 1
        for M in (int(m) for m in args.microbatches.split(",")):
            sets = [*args.set, f"mesh.pipeline={P}", "mesh.fsdp=1", f"pipeline.schedule={schedule}"]
            sets += [f"pipeline.microbatches={M}", f"pipeline.repeats={R}"]
            result = measure(args, sets, base_env, out)
            theory = 1 - Plan(stages=P, microbatches=M, repeats=R, schedule=schedule).bubble
            if result is None:
                rows.append((f"{schedule} R={R}", P, M, None, None, theory))
                continue
            last = result
            efficiency = one_ms / (P * result["step_time_ms"])
            rows.append((f"{schedule} R={R}", P, M, result["step_time_ms"], efficiency, theory))
    where = f", {last['device']}, jax {last['jax']}" if last else ""
    print(f"{args.preset}, global batch {args.batch}{where}")
    print("| schedule | GPUs | microbatches | step (ms) | measured efficiency | 1 - bubble |")
    print("|---|---|---|---|---|---|")
    for name, gpus, M, ms, eff, theory in rows:
        cells = [name, gpus, M, "failed" if ms is None else f"{ms:.2f}"]
        cells += ["-" if eff is None else f"{100 * eff:.1f}%", "-" if theory is None else f"{100 * theory:.1f}%"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
