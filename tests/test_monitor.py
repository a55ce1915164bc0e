"""Monitoring: a training run scraped over Prometheus while it runs, its metrics.jsonl against the schema
and its TensorBoard files read back, goodput (and restart time on a resume), the profile.steps trace,
the port errors, NVML through a stand-in module, and the advisor's rules on synthetic metric streams."""

import json
import shutil
import socket
import time
import types
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsjax import monitor as mon
from dsjax import rundir, train
from dsjax.advisor import Advisor
from dsjax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    MonitorConfig,
    PrecisionConfig,
    ProfileConfig,
    TrainConfig,
    preset,
)
from dsjax.metrics import FIELDS, check_record

MODEL = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
TRAINING_KEYS = {"loss", "grad_norm", "param_norm", "update_norm", "lr", "loss_scale", "tokens_per_sec"}
TRAINING_KEYS |= {"step_time_s", "goodput", "productive_s", "wall_s", *(f"{c}_s" for c in mon.LOST)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(steps=8, port=0, profile="", every=4) -> Config:
    return Config(
        model=MODEL,
        mesh=MeshConfig(),
        data=DataConfig(source="default"),
        train=TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=2, eval_every=0, eval_batches=1),
        checkpoint=CheckpointConfig(every=every, keep=10),
        monitor=MonitorConfig(prometheus_port=port, run_name="probe"),
        profile=ProfileConfig(steps=profile),
    )


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(metric name, label text): value} of one Prometheus scrape."""
    found = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("dsjax_"):
            name, value = line.rsplit(" ", 1)
            metric, _, labels = name.partition("{")
            found[(metric, labels.rstrip("}"))] = float(value)
    return found


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """A short run with the exporter on, scraped over HTTP after each training record while it trains,
    and a profile of steps 3-4."""
    port, out = free_port(), tmp_path_factory.mktemp("runs") / "probe"
    scrapes, logs = [], []
    training = mon.Monitor.training

    def training_then_scrape(self, *args):
        written = training(self, *args)
        scrapes.append(scrape(f"http://127.0.0.1:{port}/metrics"))
        return written

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mon.Monitor, "training", training_then_scrape)
        train.train(config(port=port, profile="3:4"), out, progress=False, log=logs.append)
    return out, port, scrapes, logs


def test_the_exporter_is_scraped_during_the_run_and_releases_its_port(scraped_run):
    _, port, scrapes, logs = scraped_run
    assert any(f"127.0.0.1:{port}/metrics" in line for line in logs)
    label = 'device="all",process="0",run="probe"'
    assert [s[("dsjax_step", label)] for s in scrapes] == [2, 4, 6, 8]
    last = scrapes[-1]
    assert 0 < last[("dsjax_loss", label)] < 10
    assert last[("dsjax_tokens_per_second", label)] > 0
    assert 0 < last[("dsjax_goodput", label)] <= 1
    assert last[("dsjax_update_norm", label)] > 0
    with socket.socket() as s:  # released at exit: a server can listen there again (past the scrapes' TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_metrics_jsonl_follows_the_schema_and_tensorboard_holds_the_same_values(scraped_run):
    out, *_ = scraped_run
    rows = records(out)
    for row in rows:
        check_record(row)
    training = [r for r in rows if "loss" in r]
    assert [r["step"] for r in training] == [2, 4, 6, 8]
    for row in training:
        assert row.keys() >= TRAINING_KEYS, TRAINING_KEYS - row.keys()
        assert 0 < row["goodput"] <= 1 and row["wall_s"] > row["compile_s"] > 0
    assert training[-1]["compile_s"] > 0 and training[-1]["checkpoint_s"] > 0  # the save at step 4
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm", "update_norm", "lr", "goodput"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in training}, rel=1e-6), key
    assert {e.step for e in events.Scalars("eval_loss")} == {0, 8}


def test_profile_steps_write_a_trace_and_a_record(scraped_run):
    out, *_, logs = scraped_run
    assert [r for r in records(out) if "profile" in r] == [{"step": 4, "profile": str(out / "profile")}]
    assert list((out / "profile").rglob("*.xplane.pb")), "no trace file"
    assert any("profile: steps 3-4 traced" in line for line in logs)


def test_a_resumed_run_counts_restoring_and_repeated_steps_as_restart_time(scraped_run, tmp_path):
    out, *_ = scraped_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(out, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")  # the last checkpoint lost: steps 5-8 run again
    train.train(config(steps=8), run_dir, progress=False, log=lambda _: None)
    rows = records(run_dir)
    resumed = rows[next(i for i, r in enumerate(rows) if "restored_from" in r) :]
    assert resumed[0]["restored_from"].endswith("4")
    assert [r for r in resumed if "loss" in r][-1]["restart_s"] > 0


def test_steps_an_earlier_attempt_ran_count_as_restart_time(tmp_path):
    with mon.Monitor(config(), "redo", log=lambda _: None) as m:
        m.redo_until = 6  # the earlier attempt logged step 6; this one resumed from step 2
        m.goodput.start -= 10.0  # 10 s of steps 3-4 (nothing else was lost)
        m.training({"step": 4, "loss": 1.0}, (3, 4))
        assert m.goodput.lost["restart"] == pytest.approx(10.0, abs=0.5)  # both were repeats
        m.goodput.start -= 8.0  # 8 s of steps 5-8
        m.goodput.add("checkpoint", 4.0)  # of which a save took 4 s: not a step, not double counted
        m.training({"step": 8, "loss": 1.0}, (5, 8))
        assert m.goodput.lost["restart"] == pytest.approx(12.0, abs=0.5)  # 5 and 6 of 4 steps in 4 s
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 5.0}\n{"step": 6, "loss": 2.0}\nnot json\n')
    assert rundir.last_logged_step(tmp_path) == 6


def test_a_taken_port_is_a_config_error_before_anything_runs(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = f"monitor.prometheus_port={port}: cannot serve metrics on 127.0.0.1:{port} .* another process holds"
        with pytest.raises(ConfigError, match=message):
            train.train(config(port=port), tmp_path / "run", progress=False, log=lambda _: None)
        assert not (tmp_path / "run").exists()
        code = train.main([f"--out={tmp_path / 'cli'}", f"--monitor.prometheus_port={port}", "--train.steps=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"monitor.prometheus_port={port}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"monitor": {"prometheus_port": 70000}}, "monitor.prometheus_port must be a TCP port"),
        ({"monitor": {"gpu_every_s": 0}}, "monitor.gpu_every_s must be > 0"),
        ({"profile": {"steps": "5"}}, "profile.steps must be START:END"),
        ({"profile": {"steps": "4:2"}}, "profile.steps must be START:END"),
        ({"profile": {"steps": "5:500"}}, "ends after train.steps"),
    ],
)
def test_monitor_and_profile_config_errors_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Config.from_dict({**Config().to_dict(), **overrides})


class FakeNvml(types.SimpleNamespace):
    """The few pynvml functions GpuStats calls, over fixed readings per GPU index."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    def __init__(self, count=2, fail=None):
        super().__init__(count=count, fail=fail, shut=False, samples=0, util=40)

    def nvmlInit(self):
        if self.fail:
            raise RuntimeError(self.fail)

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        self.samples += 1
        return types.SimpleNamespace(gpu=self.util + 10 * h)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 50 + h

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000 + 1000 * h  # milliwatts

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1980


def test_gpu_stats_sample_in_the_background_and_aggregate_per_record():
    fake = FakeNvml(count=2)
    stats = mon.GpuStats([0, 1, 5], every_s=0.01, log=print, nvml=fake)  # index 5 does not exist: left out
    time.sleep(0.1)
    taken = stats.take()
    stats.close()
    assert fake.samples > 2 * 2  # the thread sampled both GPUs again after the first sample
    assert fake.shut and set(taken) == {"gpu0", "gpu1"}
    assert stats.take() == taken  # no sample since: the last means again, not a record without GPU keys
    assert taken["gpu1"] == {
        "gpu_utilization_pct": 50.0,
        "gpu_memory_used_bytes": 2 * 2**30,
        "gpu_temperature_c": 51.0,
        "gpu_power_w": 301.0,
        "gpu_sm_clock_mhz": 1980.0,
    }
    whole = mon.aggregate(taken)
    assert whole["gpu_utilization_pct"] == 45.0 and whole["gpu_power_w"] == 601.0
    assert whole["gpu_temperature_c"] == 51.0 and whole["gpu_memory_used_bytes"] == 2 * 2**30
    check_record({"step": 1, **whole})


def test_a_window_shorter_than_the_sampling_period_reads_the_gpus_then_rather_than_repeat_old_figures():
    # On an H200 the first three records of a gpt2-124m run repeated the utilisation sampled while the
    # step compiled (9%): log windows of 0.7 s, samples every 2 s. The advisor then advised on them.
    fake = FakeNvml(count=1)
    stats = mon.GpuStats(None, every_s=3600, log=print, nvml=fake)  # the thread never samples in this test
    fake.util = 97
    assert stats.take()["gpu0"]["gpu_utilization_pct"] == 97.0
    fake.util = 98
    assert stats.take()["gpu0"]["gpu_utilization_pct"] == 98.0
    stats.close()


def test_a_take_between_the_threads_readings_of_two_gpus_reads_the_one_still_missing():
    fake = FakeNvml(count=2)
    stats = mon.GpuStats(None, every_s=3600, log=print, nvml=fake)
    fake.util = 90
    handles, stats.handles = stats.handles, {0: 0}
    stats._sample()  # the thread's reading of GPU 0 only, as if take() came before it reached GPU 1
    stats.handles = handles
    taken = stats.take()
    assert taken["gpu0"]["gpu_utilization_pct"] == 90.0 and taken["gpu1"]["gpu_utilization_pct"] == 100.0
    stats.close()


def test_without_nvml_the_monitor_says_so_once_and_goes_on(monkeypatch):
    monkeypatch.setattr(mon, "_said_unavailable", False)
    logs = []
    for _ in range(2):
        stats = mon.GpuStats(None, every_s=0.01, log=logs.append, nvml=FakeNvml(fail="NVML Shared Library Not Found"))
        assert not stats.available and stats.take() == {}
        stats.close()
    assert len(logs) == 1 and "GPU stats unavailable (RuntimeError: NVML Shared Library Not Found)" in logs[0]


def test_a_monitor_with_nvml_puts_gpu_stats_in_the_record_and_exports_them_per_device(tmp_path):
    port = free_port()
    cfg = config(port=port)
    with mon.Monitor(cfg, "gpus", log=lambda _: None, nvml=FakeNvml(count=2)) as m:
        m.attach(tmp_path)
        written = m.training({"step": 2, "loss": 1.0}, (1, 2))[0]
        exported = scrape(f"http://127.0.0.1:{port}/metrics")
    assert written["gpu_utilization_pct"] == 45.0
    assert exported[("dsjax_gpu_utilization_percent", 'device="gpu1",process="0",run="probe"')] == 50.0
    assert exported[("dsjax_gpu_power_watts", 'device="all",process="0",run="probe"')] == 601.0


def healthy(step: int, **extra) -> dict:
    return {
        "step": step,
        "loss": 3.0,
        "loss_scale": 65536.0,
        "skipped_steps": 0,
        "mfu": 0.40,
        "gpu_utilization_pct": 95.0,
        "memory_peak_bytes": 70 * 2**30,
        "memory_limit_bytes": 80 * 2**30,
        "wall_s": step * 1.0,
        "data_wait_s": step * 0.01,
        **extra,
    }


def stream(advisor, rows):
    return [change for row in rows for change in advisor.observe(row)]


def advisor_for(name: str = "gpt2-124m") -> Advisor:
    return Advisor(preset(name), "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize(
    "rule, bad, name",
    [
        ("gpu_utilization", lambda s: {"gpu_utilization_pct": 45.0}, "gpt2-124m"),
        ("input_bound", lambda s: {"data_wait_s": s * 0.4}, "gpt2-124m"),
        ("loss_scale", lambda s: {"skipped_steps": s // 2, "loss_scale": 0.5}, "gpt2-124m"),
        # gpt2-124m runs without remat, so there is no lighter policy to suggest: llama-1b's dots_attention
        ("memory_headroom", lambda s: {"memory_peak_bytes": 20 * 2**30}, "llama-1b"),
        ("mfu_below_benchmark", lambda s: {"mfu": 0.10}, "gpt2-124m"),
        ("mfu_below_benchmark", lambda s: {"mfu": 0.10}, "llama-1b"),
    ],
)
def test_each_advisor_rule_fires_on_its_stream_and_clears(rule, bad, name):
    advisor = advisor_for(name)
    changes = stream(advisor, [healthy(s, **bad(s)) for s in (10, 20, 30, 40)])
    assert [r for r, _ in changes] == [rule], changes
    assert changes[0][1]
    cleared = stream(advisor, [healthy(s) for s in (50, 60, 70, 80)])
    assert cleared == [(rule, None)]


def test_without_remat_there_is_no_lighter_policy_to_suggest():
    assert preset("gpt2-124m").remat.policy == "none"
    changes = stream(advisor_for("gpt2-124m"), [healthy(s, memory_peak_bytes=20 * 2**30) for s in (10, 20, 30)])
    assert changes == []


@pytest.mark.parametrize("policy, fires", [("fp16", True), ("bf16", False)])
def test_a_loss_scale_pinned_at_its_floor_is_advice_only_with_loss_scaling(policy, fires):
    cfg = preset("gpt2-124m")
    advisor = Advisor(cfg.replace(precision=PrecisionConfig(policy=policy)), "NVIDIA H100 80GB HBM3")
    rows = [healthy(s, skipped_steps=s // 60, loss_scale=1.0) for s in (10, 40, 70, 100)]  # one skip, step 60
    changes = stream(advisor, rows)
    assert [rule for rule, _ in changes] == (["loss_scale"] if fires else [])
    if fires:
        assert "fp16 is overflowing" in changes[0][1] and "precision.min_scale = 1" in changes[0][1]


def test_the_advisor_is_silent_on_a_healthy_stream():
    assert stream(advisor_for(), [healthy(s) for s in range(10, 200, 10)]) == []


def test_advice_names_the_fix_and_is_logged_exported_and_written(tmp_path):
    port = free_port()
    logs = []
    with mon.Monitor(config(port=port), "advice", log=logs.append) as m:
        m.attach(tmp_path)
        for step in (2, 4, 6):
            m.training(healthy(step, skipped_steps=step, loss_scale=1.0), (step - 1, step))
        exported = scrape(f"http://127.0.0.1:{port}/metrics")
    advice = [r for r in records(tmp_path) if "advice" in r]
    assert [r["advice"] for r in advice] == ["loss_scale"] and "no loss scaling" in advice[0]["message"]
    assert any(line.startswith("advice (loss_scale): ") for line in logs)
    assert exported[("dsjax_advice", 'device="all",process="0",rule="loss_scale",run="probe"')] == 1.0


def test_the_prometheus_names_are_unique():
    names = [f.prom for f in FIELDS.values() if f.prom]
    assert len(names) == len(set(names))


def test_on_cpus_the_monitor_says_once_per_process_that_there_are_no_gpu_stats(monkeypatch):
    monkeypatch.setattr(mon, "_said_unavailable", False)
    logs = []
    for _ in range(2):
        mon.Monitor(config(), "cpu", log=logs.append).close()
    assert logs == [
        "GPU stats unavailable (this run's devices are cpu, not NVIDIA GPUs); training goes on without them "
        "(monitor.gpu_stats=false hides this)."
    ]


def test_a_profile_without_a_run_directory_and_a_port_past_65535_are_config_errors():
    with (
        mon.Monitor(config(profile="1:2"), log=lambda _: None) as m,
        pytest.raises(ConfigError, match=r"profile\.steps=1:2 writes a trace into the run directory"),
    ):
        m.profile.check()
    with pytest.raises(ConfigError, match=r"monitor.prometheus_port=65535 \+ local rank 3 = 65538: past the last"):
        mon.PrometheusSink("127.0.0.1", 65535, 3, "run", 0)
