"""Real multi-process jobs on CPU (jax.distributed over Gloo), started by `python -m dsjax.launch` or by
hand: CommContext verbs across 2 and 4 processes, a 2-process training run against a 1-process run on
the same global mesh, kill -9 of a worker (restart, and elastic restart on fewer processes), a peer
killed outside a launcher, and SIGTERM to a job that has nothing to save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training import SMALL_FLAGS

from dsjax import distributed as dd
from dsjax.launch import free_port

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 420
STEPS, EVERY, BATCH = 24, 4, 8
TRAIN = [
    *SMALL_FLAGS,
    f"--train.batch_size={BATCH}",
    f"--train.steps={STEPS}",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.sample_tokens=0",
    f"--checkpoint.every={EVERY}",
    "--checkpoint.keep=100",
]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return {**out, "JAX_PLATFORMS": "cpu", "DSJAX_PEER_TIMEOUT": "8", **extra}


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dsjax.launch", *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("timed out:\n" + out[-4000:]) from None
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, the last record of each step (a resumed run repeats steps after its checkpoint)."""
    got = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            got[r["step"]] = r["loss"]
    return got


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's dsjax.train children."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


def wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def has_checkpoint(out: Path, step: int) -> bool:
    return (out / "checkpoints" / str(step) / "dsjax_manifest.json").is_file()


@pytest.mark.parametrize("nproc, devices", [(2, 1), (4, 2)])
def test_comm_context_verbs_across_processes(nproc, devices):
    out = finish(launch(f"--nproc={nproc}", f"--cpu-devices-per-proc={devices}", "--run=tests/comm_worker.py"))
    oks = [line for line in out.splitlines() if "comm ok" in line]
    assert sorted(int(line.split()[-2]) for line in oks) == list(range(nproc)), out[-3000:]
    assert len({line.split()[-1] for line in oks}) == 1  # every rank checked as many values


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job on one process with the same global mesh (4 devices), uninterrupted."""
    out = tmp_path_factory.mktemp("runs") / "one"
    cmd = [sys.executable, "-m", "dsjax.train", "--cpu-devices=4", f"--out={out}", *TRAIN]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_train_like_one(reference, tmp_path):
    out = tmp_path / "two"
    log = finish(launch("--nproc=2", "--cpu-devices-per-proc=2", "--", f"--out={out}", *TRAIN))
    assert "over 4 cpu device(s)" in log
    assert not any(line.startswith("[rank 1]") and "loss" in line for line in log.splitlines())  # rank 0 reports
    want, got = losses(reference), losses(out)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.mark.parametrize("elastic", [False, True], ids=["restart", "elastic"])
def test_kill_9_of_a_worker_restarts_the_job(reference, tmp_path, elastic):
    """kill -9 of rank 1 after checkpoint 8: the launcher restarts the job, which resumes and finishes
    with the uninterrupted run's losses; elastic (--min-nproc=1), it restarts on 1 process (2 devices),
    and every sample is still used exactly once."""
    out = tmp_path / "job"
    extra = ["--min-nproc=1"] if elastic else []
    proc = launch("--nproc=2", "--cpu-devices-per-proc=2", *extra, "--", f"--out={out}", *TRAIN)
    wait_for(lambda: has_checkpoint(out, 2 * EVERY) or proc.poll() is not None, "checkpoint 8")
    ranks = workers(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    log = finish(proc)
    assert "rank 1: killed by SIGKILL" in log, log[-3000:]
    assert ("restarting with 1 (elastic" in log) == elastic
    assert "attempt 2: " + ("1 process(es)" if elastic else "2 process(es)") in log
    restored = [line for line in log.splitlines() if "restored" in line]
    assert restored, log[-3000:]
    resumed_at = int(restored[0].split("(step ")[1].split(",")[0])
    assert resumed_at >= 2 * EVERY and f"{resumed_at * BATCH} samples" in restored[0]
    if elastic:
        assert "over 2 cpu device(s)" in log.split("attempt 2")[1]
    want, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    rel = 1e-4 if elastic else 1e-5  # 2 devices instead of 4 sum in another order
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), step
    final = json.loads((out / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert final["samples"] == STEPS * BATCH  # every sample once: the data position ends where a clean run's does


def test_sigterm_to_one_process_stops_the_job_at_one_agreed_step(tmp_path):
    """SIGTERM to rank 1 only: both processes agree (at a log step) on the step to stop after, save that
    checkpoint together and exit 75; the launcher does not restart a preempted job, and the same command
    resumes from that checkpoint."""
    out = tmp_path / "job"
    args = ["--nproc=2", "--cpu-devices-per-proc=1", "--", f"--out={out}", *TRAIN, "--train.log_every=3"]
    proc = launch(*args, "--train.steps=100000")  # the last value of a flag wins
    wait_for(lambda: has_checkpoint(out, EVERY) or proc.poll() is not None, "checkpoint 4")
    os.kill(workers(proc.pid)[1], signal.SIGTERM)
    log, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, log[-3000:]
    stops = {line.split("stopped after step ")[1].split(",")[0] for line in log.splitlines() if "after step" in line}
    assert len(stops) == 1, log[-3000:]  # both ranks name the same step
    stop = int(stops.pop())
    assert stop % 3 == 0 and has_checkpoint(out, stop)  # agreed at a log step, saved with its manifest
    assert "not restarting" in log and "another process was signalled" in log
    again = finish(launch(*args, f"--train.steps={stop + 2}"))
    assert f"restored {out / 'checkpoints' / str(stop)} (step {stop}," in again


def test_sigterm_ends_a_job_that_has_nothing_to_save(tmp_path):
    """jax.distributed's own SIGTERM handler only notes the signal; dsjax puts the previous one back, so a job
    without checkpoints (and any job before step 0) ends on SIGTERM as one process does, instead of running
    on to its last step while the launcher waits."""
    out = tmp_path / "job"
    args = ["--nproc=2", "--cpu-devices-per-proc=1", "--", f"--out={out}", *TRAIN, "--checkpoint.enabled=false"]
    proc = launch(*args, "--train.steps=100000")  # the last value of a flag wins
    wait_for(lambda: (out / "metrics.jsonl").is_file() or proc.poll() is not None, "the first step")
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "rank 0: killed by SIGTERM, rank 1: killed by SIGTERM" in log


def test_a_dead_peer_outside_a_launcher_ends_the_others_within_the_bound(tmp_path):
    """Two processes started by hand (torchrun-style variables); rank 1 is killed; rank 0 exits non-zero
    within the peer timeout, with a message that names process 1."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, JAX_NUM_CPU_DEVICES="1")
        cmd = [sys.executable, "-m", "dsjax.train", f"--out={tmp_path / 'job'}", *TRAIN, "--train.steps=100000"]
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: has_checkpoint(tmp_path / "job", EVERY) or procs[0].poll() is not None, "training", 300)
        procs[1].kill()
        killed = time.monotonic()
        procs[0].wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    text = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode not in (0, None), text[-3000:]
    assert took < 8 + 10, (took, text[-3000:])  # the peer timeout (8 s) plus the watch's polling
    assert "process 1 of 2" in text, text[-3000:]
    assert "Traceback" not in text


def test_peer_watch_names_a_failed_process(capsys):
    """The watch's decision logic on a fake key-value store: a peer that posted a failure ends this
    process at once, quoting it; one whose beats stop ends it after the timeout."""
    store: dict[str, str] = {}

    class Client:
        def key_value_set(self, key, value, allow_overwrite=False):
            store[key] = value

        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in store.items() if k.startswith(prefix)]

    exits: list[int] = []
    original = dd._client
    dd._client = lambda: Client()
    try:
        store["dsjax/alive/1"] = "failed:dsjax: error: bad flag"
        watch = dd.PeerWatch(dd.ProcessEnv(3, 0, coordinator="x:1", source="test"), 0.5, exit=exits.append)
        wait_for(lambda: exits, "the watch to act", 10)
        watch.close()
        assert exits == [dd.PEER_LOST_EXIT_CODE]
        assert "process 1 of 3 failed: dsjax: error: bad flag" in capsys.readouterr().err
        store.clear()
        exits.clear()
        store["dsjax/alive/2"] = "7"  # never changes: silent
        store["dsjax/alive/1"] = "exited"  # finished normally: not expected to beat
        start = time.monotonic()
        watch = dd.PeerWatch(dd.ProcessEnv(3, 0, coordinator="x:1", source="test"), 0.5, exit=exits.append)
        wait_for(lambda: exits, "the watch to act", 10)
        watch.close()
        assert 0.5 <= time.monotonic() - start < 5 and exits == [dd.PEER_LOST_EXIT_CODE]
        assert "process 2 of 3 has not been heard from" in capsys.readouterr().err
    finally:
        dd._client = original
