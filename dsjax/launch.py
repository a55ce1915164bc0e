"""`python -m dsjax.launch`: run a job as N local processes, restart it when a process dies.

    python -m dsjax.launch --nproc=2 [--cpu-devices-per-proc=2] [--max-restarts=3] [--min-nproc=1] \\
        -- --preset=tiny --out=runs/job

Each process gets the torchrun-style contract that `dsjax.distributed.initialize` reads (WORLD_SIZE,
RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port; DSJAX_RESTART=the
attempt), so the processes form one `jax.distributed` job; the launcher itself never carries data. Every
output line is prefixed with its rank. When a process exits non-zero, the others are killed at once and
the whole job starts again (it resumes from its latest checkpoint), up to --max-restarts times. With
--min-nproc below --nproc the job is elastic: a process that died of a signal (killed, crashed) is taken
to have lost its slot, and the job restarts with one process fewer, never below --min-nproc; the
checkpoint is restored onto the smaller mesh. A bad config (exit 2) is not retried, nor a job whose
processes were preempted (exit 75, after their checkpoint). SIGTERM / SIGINT to the launcher are passed
on: the processes save a checkpoint and the launcher exits with their code.

The arguments after `--` go to `python -m dsjax.train` (or to --run=MODULE / --run=script.py). For
dsjax.train without --out the launcher chooses runs/<time>-launch, so that restarts resume one directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dsjax.jobenv import MAX_CPU_DEVICES, cpu_thread_env

CONFIG_EXIT_CODE = 2  # dsjax.train's exit code for a bad config or flag: restarting cannot help
PREEMPTED_EXIT_CODE = 75  # dsjax.checkpoint.PREEMPTED_EXIT_CODE (not imported: the launcher never loads JAX)
SCHEDULER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
SCHEDULER_VARS = ("JOB_COMPLETION_INDEX",)
USAGE = "python -m dsjax.launch --nproc=N [options] -- <arguments of python -m dsjax.train>"


class LaunchError(ValueError):
    """A bad launcher flag; the message names it."""


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m dsjax.launch", usage=USAGE, description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--nproc", type=int, required=True, help="processes to start (one per GPU on GPU hosts)")
    p.add_argument("--cpu-devices-per-proc", type=int, default=None, help="CPU devices per process (CPU runs)")
    p.add_argument("--gpus-per-proc", type=int, default=None, help="GPUs per process (CUDA_VISIBLE_DEVICES blocks)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after a failure before giving up")
    p.add_argument("--min-nproc", type=int, default=None, help="elastic: fewest processes to restart with")
    p.add_argument("--run", default="dsjax.train", help="module (or script.py) each process runs")
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one per attempt)")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        raise LaunchError(
            f"unknown launcher flag(s) {' '.join(unknown)}; the flags of the script each process runs go after "
            f"`--`: {USAGE}."
        )
    if args.cpu_devices_per_proc is not None and args.gpus_per_proc is not None:
        raise LaunchError(
            "--cpu-devices-per-proc and --gpus-per-proc exclude each other: the first runs the processes on CPU "
            "devices, the second gives each its GPUs."
        )
    if args.nproc < 1:
        raise LaunchError(f"--nproc must be at least 1, got {args.nproc}.")
    if args.min_nproc is None:
        args.min_nproc = args.nproc
    if not 1 <= args.min_nproc <= args.nproc:
        raise LaunchError(f"--min-nproc={args.min_nproc} must be between 1 and --nproc={args.nproc}.")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {args.max_restarts}.")
    for name in ("cpu_devices_per_proc", "gpus_per_proc"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.cpu_devices_per_proc is not None and args.nproc * args.cpu_devices_per_proc > MAX_CPU_DEVICES:
        raise LaunchError(
            f"--nproc={args.nproc} x --cpu-devices-per-proc={args.cpu_devices_per_proc} is "
            f"{args.nproc * args.cpu_devices_per_proc} simulated CPU devices on this machine, more than "
            f"{MAX_CPU_DEVICES}: each brings its own threads, and thousands take minutes to start and stop."
        )
    if args.run.endswith(".py"):
        if not Path(args.run).is_file():
            raise LaunchError(f"--run={args.run}: there is no such script.")
    elif not _importable(args.run):
        raise LaunchError(
            f"--run={args.run}: no module of that name can be imported here; give a module (dsjax.train, the "
            "default) or a script ending in .py."
        )
    if not 0 <= args.port < 65536:
        raise LaunchError(f"--port must be in 0..65535, got {args.port}.")
    if args.run == "dsjax.train" and any(a == "--cpu-devices" or a.startswith("--cpu-devices=") for a in rest):
        raise LaunchError(
            "--cpu-devices after `--` would set each process's CPU devices behind the launcher's back (past its "
            "device cap, without the threads it sizes for them); give them as --cpu-devices-per-proc."
        )
    if args.run == "dsjax.train" and not any(a.startswith("--out=") or a == "--out" for a in rest):
        rest.append(f"--out=runs/{time.strftime('%Y%m%d-%H%M%S')}-launch")
    return args, rest


def _importable(module: str) -> bool:
    """Whether `module` can be found (its parent packages are imported to look; not the module itself)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_list() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def process_envs(args: argparse.Namespace, nproc: int, port: int, attempt: int) -> list[dict[str, str]]:
    """The environment of each of `nproc` processes."""
    envs = []
    gpus = _gpu_list() if args.cpu_devices_per_proc is None else []
    per = args.gpus_per_proc or (len(gpus) // nproc if gpus and len(gpus) >= nproc else None)
    if args.gpus_per_proc and len(gpus) < nproc * args.gpus_per_proc:
        raise LaunchError(
            f"--nproc={nproc} x --gpus-per-proc={args.gpus_per_proc} needs {nproc * args.gpus_per_proc} GPUs; "
            f"{len(gpus)} are visible."
        )
    for rank in range(nproc):
        # The launcher defines the job: a scheduler's own description of it (this launcher running as
        # one SLURM task, one pod of an Indexed Job) would contradict the contract below.
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCHEDULER_PREFIXES) and k not in SCHEDULER_VARS}
        env.update(
            WORLD_SIZE=str(nproc),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DSJAX_RESTART=str(attempt),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("TQDM_MININTERVAL", "10")  # a progress bar redraw is a log line here: a few suffice
        if args.cpu_devices_per_proc is not None:
            env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.cpu_devices_per_proc))
            env.update(cpu_thread_env(args.cpu_devices_per_proc, env))
        elif per:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[rank * per : (rank + 1) * per])
        envs.append(env)
    return envs


def _pump(stream, rank: int, lock: threading.Lock) -> None:
    """Copy a process's output to ours one whole line at a time, prefixed with its rank; a carriage
    return (a progress bar redrawing itself) ends a line too."""
    prefix, pending = f"[rank {rank}] ".encode(), b""
    while chunk := stream.read1(65536):
        parts = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
        pending = parts.pop()
        lines = [prefix + part + b"\n" for part in parts if part.strip()]
        if lines:
            with lock:
                sys.stdout.buffer.write(b"".join(lines))
                sys.stdout.flush()
    if pending.strip():
        with lock:
            sys.stdout.buffer.write(prefix + pending + b"\n")
            sys.stdout.flush()
    stream.close()


class Job:
    """One attempt: `nproc` processes started together and torn down together."""

    def __init__(self, command: list[str], envs: list[dict[str, str]]):
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for rank, env in enumerate(envs):
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
            pump = threading.Thread(target=_pump, args=(proc.stdout, rank, self.lock), daemon=True)
            pump.start()
            self.procs.append(proc)
            self.pumps.append(pump)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)

    def wait(self, stop: threading.Event) -> tuple[list[int | None], list[int]]:
        """Wait until every process exited 0, or one failed (then kill the rest). Returns the exit codes
        at the moment of the first failure (None: still running then) and the ranks that had failed."""
        while True:
            if stop.is_set():  # a signal to the launcher: the processes got it too; let them all save
                for p in self.procs:
                    p.wait()
                codes = [p.poll() for p in self.procs]
                failed = [r for r, c in enumerate(codes) if c != 0]
                break
            codes = [p.poll() for p in self.procs]
            # A preempted process (75) is not a failure: the others are saving the same step, let them.
            failed = [r for r, c in enumerate(codes) if c not in (None, 0, PREEMPTED_EXIT_CODE)]
            if failed:
                break
            if all(c is not None for c in codes):
                failed = [r for r, c in enumerate(codes) if c != 0]
                break
            time.sleep(0.05)
        if failed:
            self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        for t in self.pumps:
            t.join(timeout=5)
        return codes, failed


def _describe(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def launch(args: argparse.Namespace, rest: list[str]) -> int:
    target = [sys.executable, args.run] if args.run.endswith(".py") else [sys.executable, "-m", args.run]
    command = target + rest
    stop = threading.Event()
    received: list[int] = []
    job: list[Job] = []

    def forward(signum, frame):
        received.append(signum)
        stop.set()
        if job:
            job[0].signal_all(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        nproc, attempt, first = args.nproc, 0, time.monotonic()
        while True:
            if received:  # a signal between attempts: start nothing
                say(f"stopped by {signal.Signals(received[0]).name} before attempt {attempt + 1}")
                return 128 + received[0]
            port = args.port or free_port()
            envs = process_envs(args, nproc, port, attempt)
            say(f"attempt {attempt + 1}: {nproc} process(es), coordinator 127.0.0.1:{port}: {' '.join(command)}")
            job[:] = [Job(command, envs)]
            if received:  # it arrived while the processes were starting: pass it on
                job[0].signal_all(received[-1])
            started = time.monotonic()
            codes, failed = job[0].wait(stop)
            if not failed:
                total = f" ({time.monotonic() - first:.1f} s since attempt 1 started)" if attempt else ""
                say(f"all {nproc} process(es) finished in {time.monotonic() - started:.1f} s{total}")
                return 0
            listed = ", ".join(f"rank {r}: {_describe(codes[r])}" for r in failed)
            if received:
                code = next((codes[r] for r in failed if codes[r] and codes[r] > 0), 128 + received[0])
                say(f"stopped by {signal.Signals(received[0]).name} ({listed})")
                return code
            if all(codes[r] == PREEMPTED_EXIT_CODE for r in failed):
                say(f"the job was preempted and saved its checkpoint ({listed}); not restarting.")
                return PREEMPTED_EXIT_CODE
            if any(codes[r] == CONFIG_EXIT_CODE for r in failed):
                say(f"a process rejected its configuration ({listed}); not restarting.")
                return CONFIG_EXIT_CODE
            if attempt >= args.max_restarts:
                say(f"giving up after {attempt} restart(s): {listed}")
                return next((codes[r] for r in failed if codes[r] and codes[r] > 0), 1)
            lost = sum(1 for r in failed if codes[r] is not None and codes[r] < 0)
            if args.min_nproc < args.nproc and lost:
                if nproc - lost < args.min_nproc:
                    say(
                        f"{lost} slot(s) lost ({listed}): {nproc - lost} left, fewer than --min-nproc="
                        f"{args.min_nproc}; giving up."
                    )
                    return 1
                nproc -= lost
                say(f"process(es) lost ({listed}); restarting with {nproc} (elastic, --min-nproc={args.min_nproc})")
            else:
                say(f"process(es) failed ({listed}); restarting all {nproc}")
            attempt += 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def say(message: str) -> None:
    print(f"[launch] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, rest = parse(sys.argv[1:] if argv is None else argv)
        return launch(args, rest)
    except LaunchError as err:
        print(f"dsjax.launch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
