"""`python -m dsjax.train`: help, one-paragraph errors with exit 2, --dry-run, --cpu-devices and a short run.

In-process `main([...])` wherever possible (JAX is already up with the 8 test devices); a subprocess only
for what needs a fresh interpreter (exit codes, --cpu-devices).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
from training import SMALL_FLAGS

from dsjax import train
from dsjax.config import SECTIONS, Config, ConfigError, apply_overrides, preset

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every test from tmp_path so a default run directory (runs/...) never lands in the repo."""
    monkeypatch.chdir(tmp_path)


SMALL = SMALL_FLAGS  # the dry runs compile the train step


def run_main(capsys, *argv):
    code = train.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


SUBPROCESS_CASES = {
    "unknown-field": ["--train.stpes=3"],
    "cpu-devices-0": ["--cpu-devices=0"],
    "cpu-devices-x": ["--cpu-devices=x"],
    "dry-run-4": ["--cpu-devices=4", "--dry-run", "--mesh.fsdp=2", "--mesh.tensor=2", "--train.batch_size=4", *SMALL],
}


@pytest.fixture(scope="module")
def cli_runs():
    """Every `python -m dsjax.train` subprocess of this module, started together (each pays the jax import)."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dsjax.train", *argv],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in SUBPROCESS_CASES.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=180)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def assert_one_paragraph_error(err, *fragments):
    assert err.startswith("dsjax: error:"), err
    assert "Traceback" not in err
    assert "\n" not in err.strip(), f"not one paragraph: {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


# ----------------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_usage_and_every_field(capsys, flag):
    code, out, err = run_main(capsys, flag)
    assert code == 0 and err == ""
    assert out.startswith(train.USAGE)
    for option in ("--preset=NAME", "--out=DIR", "--cpu-devices=N", "--dry-run"):
        assert option in out
    for section, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            assert f"--{section}.{f.name}=" in out
    for spot in ("--model.d_model=128 ", "--train.steps=200 ", "--mesh.fsdp=-1 ", "--data.source='default'"):
        assert spot in out
    assert "pipeline-parallel degree" in out  # docs are printed too


def test_help_shows_the_presets_defaults(capsys):
    code, out, _ = run_main(capsys, "--preset=gpt2-124m", "--help")
    assert code == 0
    assert "--model.d_model=768 " in out and "--model.n_layers=12 " in out and "--model.vocab_size=50304 " in out
    assert "--model.d_model=128 " not in out


def test_help_with_unknown_preset_is_an_error(capsys):
    code, out, err = run_main(capsys, "--preset=nope", "--help")
    assert code == 2 and out == ""
    assert_one_paragraph_error(err, "'nope'", "gpt2-124m")


# ----------------------------------------------------------------------------------------------------
# bad inputs: exit 2, one paragraph on stderr, nothing trained


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--train.stpes=3"], ["--train.stpes", "did you mean --train.steps"]),
        (["--modle.d_model=3"], ["--modle.d_model", "did you mean --model.d_model"]),
        (["--train.steps=abc"], ["--train.steps", "an integer", "'abc'"]),
        (["--model.tie_embeddings=maybe"], ["--model.tie_embeddings", "a boolean"]),
        (["--preset=nope"], ["--preset='nope'", "tiny", "gpt2-124m", "llama-1b", "llama-7b"]),
        (["--preset"], ["--preset needs a value"]),
        (["--out"], ["--out needs a value"]),
        (["--dry-run=yes"], ["--dry-run takes no value"]),
        (["--bogus"], ["unknown option --bogus"]),
        (["positional"], ["unexpected argument 'positional'"]),
        (["--model.n_kv_heads=3"], ["model.n_heads (4)", "model.n_kv_heads (3)"]),
        (["--train.seq_len=512"], ["train.seq_len (512)", "model.max_seq_len (256)"]),
        (["--mesh.pipeline=8", "--mesh.fsdp=1"], ["model.n_layers (4)", "mesh.pipeline x pipeline.repeats = 8 x 1"]),
        (["--pipeline.schedule=1F1B"], ["pipeline.schedule must be one of", "'1F1B'"]),
        (["--mesh.data=-1"], ["mesh.data, mesh.fsdp"]),
        (["--mesh.data=3", "--mesh.fsdp=1"], ["mesh.data=3", "multiply to 3", "8 devices"]),
        (["--mesh.data=3", "--mesh.fsdp=-1"], ["mesh.fsdp=-1", "multiply to 3", "8 devices"]),
        (["--train.batch_size=12"], ["train.batch_size (12)", "1 x 8 = 8"]),
        (["--mesh.fsdp=1", "--mesh.tensor=-1"], ["model.n_heads (4)", "mesh.tensor (8)"]),
        (["--data.source=text"], ["data.source='text'", "data.path"]),
        (
            ["--data.source=text", "--data.path=does/not/exist.txt"],
            ["data.path='does/not/exist.txt'", "does not exist"],
        ),
        (["--cpu-devices=x"], ["--cpu-devices", "an integer", "'x'"]),
        (["--data.path=notes.txt"], ["data.path='notes.txt'", "data.source is 'default'", "--data.source=text"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith(("-", "p")) else None,
)
def test_bad_input_exits_2(capsys, argv, fragments):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert_one_paragraph_error(err, *fragments)
    assert "sample:" not in out and "run directory:" not in out


def test_dry_run_bad_input_exits_2(capsys):
    code, _, err = run_main(capsys, "--dry-run", "--mesh.data=3", "--mesh.fsdp=1")
    assert code == 2
    assert_one_paragraph_error(err, "multiply to 3", "8 devices")


def test_out_existing_nonempty_dir(capsys, tmp_path):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    code, _, err = run_main(capsys, f"--out={out}", "--train.steps=1")
    assert code == 2
    assert_one_paragraph_error(err, "--out=", str(out), "already holds files")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # left alone


def test_out_is_a_file(capsys, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    code, _, err = run_main(capsys, f"--out={out}", "--train.steps=1")
    assert code == 2
    assert_one_paragraph_error(err, str(out), "is a file")


def test_out_expands_the_home_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "a-file").write_text("x")
    code, _, err = run_main(capsys, "--out=~/a-file", "--train.steps=1")
    assert code == 2
    assert_one_paragraph_error(err, str(tmp_path / "home" / "a-file"), "is a file")
    assert not (tmp_path / "~").exists()  # the cwd: no directory named '~'


@pytest.mark.parametrize(
    "bad",
    [
        ["--mesh.data=3", "--mesh.fsdp=1"],
        ["--train.batch_size=12"],
        ["--data.source=text", "--data.path=does/not/exist.txt"],
    ],
    ids=["mesh", "batch", "data-path"],
)
def test_rejected_run_leaves_no_run_directory(capsys, tmp_path, bad):
    out = tmp_path / "run"
    code, _, _ = run_main(capsys, f"--out={out}", *bad)
    assert code == 2
    assert not out.exists() or not any(out.iterdir())
    code, _, _ = run_main(capsys, *bad)  # default run directory under the cwd (tmp_path)
    assert code == 2
    assert not (tmp_path / "runs").exists()


def test_top_level_flags_accept_a_separate_value():
    _, options = train._parse(["--out", "somewhere", "--preset", "gpt2-124m", "--cpu-devices", "8"])
    assert options["out"] == "somewhere" and options["preset"] == "gpt2-124m" and options["cpu_devices"] == 8


@pytest.mark.parametrize("flag", ["--dry-run=", "--help="])
def test_valueless_flags_reject_an_empty_value(flag):
    with pytest.raises(train.ConfigError, match="takes no value"):
        train._parse([flag])


def test_parse_options():
    config, options = train._parse(["--preset=gpt2-124m", "--out=x/y", "--dry-run", "--train.steps", "7"])
    assert options == {"preset": "gpt2-124m", "out": "x/y", "dry_run": True, "help": False, "cpu_devices": None}
    assert config == apply_overrides(preset("gpt2-124m"), {"train.steps": "7"})
    _, options = train._parse(["--cpu-devices=4"])
    assert options["cpu_devices"] == 4 and options["preset"] == "tiny" and options["out"] is None


# ----------------------------------------------------------------------------------------------------
# subprocess: exit codes and --cpu-devices in a fresh interpreter


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("unknown-field", "did you mean --train.steps"),
        ("cpu-devices-0", "--cpu-devices must be between 1 and 512, got 0"),
        ("cpu-devices-x", "--cpu-devices expects an integer, got 'x'"),
    ],
)
def test_subprocess_bad_input_exits_2(cli_runs, name, fragment):
    proc = cli_runs[name]
    assert proc.returncode == 2, proc.stderr
    assert_one_paragraph_error(proc.stderr, fragment)
    assert proc.stdout == ""


def test_subprocess_cpu_devices_dry_run(cli_runs):
    proc = cli_runs["dry-run-4"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "mesh: {'data': 1, 'pipeline': 1, 'fsdp': 2, 'tensor': 2} over 4 cpu device(s)" in out
    assert "parameters: " in out and "FLOPs/token: " in out
    assert "per-device memory:" in out and "  parameters  " in out and "  optimizer state  " in out
    assert "parameter shardings (path, shape, spec):" in out
    table = out.split("parameter shardings (path, shape, spec):\n", 1)[1]
    assert "'tensor'" in table and "'fsdp'" in table
    assert "dry run: compiled the train step; nothing was trained." in out
    assert "run directory:" not in out


# ----------------------------------------------------------------------------------------------------
# in-process --dry-run and a short training run


def test_dry_run_in_process(capsys, tmp_path):
    code, out, err = run_main(capsys, "--dry-run", "--mesh.fsdp=4", "--mesh.tensor=2", "--train.batch_size=8", *SMALL)
    assert code == 0, err
    assert "mesh: {'data': 1, 'pipeline': 1, 'fsdp': 4, 'tensor': 2} over 8 cpu device(s)" in out
    params = int(out.split("parameters: ", 1)[1].split(" ", 1)[0].replace(",", ""))
    # 1 llama block of D=32, F=64 (4 D^2 attention + 3 D F MLP + 2 D norms), embed + lm_head 2 V D, final norm D
    assert params == 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 2 * 256 * 32 + 32
    assert "FLOPs/token: " in out and "per-device memory:" in out
    table = out.split("parameter shardings (path, shape, spec):\n", 1)[1].splitlines()
    rows = [line for line in table if line.startswith("  ")]
    assert len(rows) >= 8
    assert any("'fsdp'" in row and "'tensor'" in row for row in rows)
    assert any("embed" in row for row in rows)
    assert "dry run: compiled the train step; nothing was trained." in out
    assert list(tmp_path.iterdir()) == []  # no runs/ directory, nothing written


TINY = [
    "--train.steps=6",
    "--train.log_every=2",
    "--train.eval_every=3",
    "--train.batch_size=8",
    "--train.seq_len=32",
    "--model.n_layers=1",
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_kv_heads=2",
    "--model.d_ff=64",
    "--train.sample_tokens=8",
]


def test_short_training_run(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run_main(capsys, f"--out={out_dir}", *TINY)
    assert code == 0, err
    assert "Traceback" not in err

    expected = apply_overrides(preset("tiny"), dict(arg[2:].split("=", 1) for arg in TINY))
    saved = Config.from_dict(json.loads((out_dir / "config.json").read_text()))
    assert saved == expected
    assert saved.model.d_model == 32 and saved.train.steps == 6

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    advice = [r for r in records if "advice" in r]  # the advisor may speak, depending on the machine's timing
    assert len(train_lines) + len(eval_lines) + len(advice) == len(records)
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert [r["step"] for r in eval_lines] == [0, 3, 6]
    for r in train_lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time_s"} <= set(r)
        assert r["mfu"] is None  # no peak FLOP/s for CPUs
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["tokens_per_sec"] > 0 and r["step_time_s"] > 0
    for r in eval_lines:
        assert 0 < r["eval_loss"] < 10

    assert "sample:\ndef " in out
    assert f"run directory: {out_dir.resolve()}" in out
    assert "mesh: {'data': 1, 'pipeline': 1, 'fsdp': 8, 'tensor': 1} over 8 cpu device(s)" in out
    assert "eval loss: " in out
    assert not (tmp_path / "runs").exists()  # --out was honoured


def test_dry_run_reports_the_pipeline_schedule(capsys):
    argv = ["--dry-run", "--mesh.pipeline=2", "--mesh.fsdp=4", "--pipeline.schedule=circular"]
    argv += ["--pipeline.repeats=2", "--pipeline.microbatches=4", "--train.memory_budget_gb=0.0001"]
    code, out, err = run_main(capsys, *argv)
    assert code == 2, err  # the preflight would stop a real run
    # tiny: 4 layers; stage 0 runs chunks 0 and 2, stage 1 chunks 1 and 3; bubble (P-1)/(R*M+P-1) = 1/9
    assert "pipeline: circular, 2 stages x 2 chunk(s), 4 microbatches, 9 unrolled ticks, bubble 11.1% " in out
    assert "(stage 0: layers 0, 2; stage 1: layers 1, 3)" in out
    assert "per-device memory:" in out and "step total" in out
    assert "preflight: a real run would stop here" in err and "--pipeline.unroll=false" in err
    code, out, err = run_main(capsys, *argv, "--pipeline.unroll=false")
    assert code == 2, err
    assert "4 microbatches, 9 scanned ticks, bubble 11.1% " in out
    assert "preflight: a real run would stop here" in err and "--pipeline.unroll=false" not in err


def test_simulated_cpu_devices_are_asked_for_before_jax_starts():
    """The notebook call: in this process JAX already runs on the suite's 8 CPU devices."""
    from dsjax.mesh import simulate_cpu_devices

    simulate_cpu_devices(8)  # already so: a notebook cell run again
    with pytest.raises(ConfigError, match=r"simulate_cpu_devices\(4\) must run before JAX.* restart the kernel"):
        simulate_cpu_devices(4)
    with pytest.raises(ConfigError, match=r"takes an integer, got '4' \(str\)"):
        simulate_cpu_devices("4")
