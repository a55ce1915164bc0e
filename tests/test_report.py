"""dsjax.report on a synthetic metrics.jsonl (no training): plots, summary numbers, repeated steps, errors.

The run below was resumed from its step-20 checkpoint, so steps 20 and 30 appear twice and the second record
of each must win. In-process wherever possible; a subprocess only for exit codes and a missing matplotlib.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from dsjax import report

REPO = pathlib.Path(__file__).resolve().parent.parent
GIB = 2**30
PNG = b"\x89PNG\r\n\x1a\n"


def train_record(step, loss, tps, skipped=0, **extra):
    record = {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_sec": tps, "step_time_s": 0.1}
    return record | {"skipped_steps": skipped} | extra


RECORDS = [
    {"step": 0, "eval_loss": 5.5},
    train_record(10, 4.0, 1000.0, mfu=0.1, mfu_causal=0.08, loss_scale=65536.0),  # first window: compiles
    train_record(20, 3.0, 2000.0, mfu=0.4, mfu_causal=0.35, loss_scale=65536.0, memory_peak_bytes=2 * GIB),
    {"step": 20, "eval_loss": 3.2},
    train_record(30, 9.9, 50.0, mfu=0.01, mfu_causal=0.01, loss_scale=65536.0),  # superseded by the resume
    {"step": 30, "advice": "data_wait", "message": "the host is slow"},
    # The job died after step 30 and resumed from the checkpoint of step 20.
    {"step": 20, "restored_from": "/runs/x/checkpoints/20"},
    {"step": 20, "eval_loss": 3.1},
    train_record(30, 2.5, 500.0, 1, mfu=0.2, mfu_causal=0.1, loss_scale=32768.0, future_key="ignored"),
    train_record(40, None, 3000.0, 2, mfu=0.5, mfu_causal=0.45, loss_scale=16384.0, memory_peak_bytes=3 * GIB),
    {"step": 40, "rollback_to": 30, "skipped_batches": [39], "reason": "the loss of step 40 is nan"},
    train_record(50, 2.25, 4000.0, 2, mfu=0.45, mfu_causal=0.4, loss_scale=16384.0, memory_limit_bytes=8 * GIB)
    | {"goodput": 0.5, "wall_s": 100.0, "productive_s": 50.0, "setup_s": 10.0, "compile_s": 20.0}
    | {"checkpoint_s": 5.0, "data_wait_s": 5.0, "eval_s": 5.0, "restart_s": 5.0},
    {"step": 50, "eval_loss": 2.0},
]
CPU_RECORDS = [{"step": 0, "eval_loss": 5.0}, train_record(10, 4.0, 100.0, mfu=None, mfu_causal=None, loss_scale=1)]


def make_run(path, records, config=True):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config:
        config = {"model": {"family": "llama", "n_layers": 4}, "mesh": {"data": 2, "fsdp": 2}}
        (path / "config.json").write_text(json.dumps(config | {"precision": {"policy": "bf16"}}))
    return path


def cli(*args, block_matplotlib=False):
    """`python -m dsjax.report ARGS`, started (not waited for): the error cases run side by side."""
    # runpy instead of `-m`, so that matplotlib can be made unimportable first.
    code = "import runpy, sys\n"
    code += "sys.modules['matplotlib'] = None\n" if block_matplotlib else ""
    code += (
        f"sys.argv = ['dsjax.report', *{list(map(str, args))!r}]\nrunpy.run_module('dsjax.report', run_name='__main__')"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_load_keeps_the_last_record_of_each_step(tmp_path):
    records = report.load(make_run(tmp_path / "run", RECORDS))
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50]
    assert train[2]["loss"] == 2.5 and "future_key" not in train[2]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [5.5, 3.1, 2.0]
    assert sum("restored_from" in r for r in records) == 1 and sum("rollback_to" in r for r in records) == 1
    loss = report.figures(records)["loss"].axes[0].lines[0]
    assert list(loss.get_xdata()) == [10, 20, 30, 50] and list(loss.get_ydata()) == [4.0, 3.0, 2.5, 2.25]


def test_write_plots_and_summary(tmp_path):
    run = make_run(tmp_path / "run", RECORDS)
    path = report.write(run)
    assert path == run / "report" / "summary.md"
    for name in report.PLOTS:
        assert (path.parent / f"{name}.png").read_bytes()[:8] == PNG, name
    text = path.read_text()
    assert f"- run: `{run}`" in text
    assert "- model: family=llama, n_layers=4" in text and "- mesh: data=2, fsdp=2" in text
    assert "- precision: policy=bf16" in text
    assert "- steps: 0 to 50 (5 training records, 3 evaluations)" in text
    assert "- loss: 4.0000 (step 10) -> 2.2500 (step 50)" in text
    assert "- non-finite loss (NaN or infinite) at 1 of 5 records: step 40" in text
    assert "- eval loss: 5.5000 (step 0) -> 2.0000 (step 50)" in text
    # After the first window and the first window after the restart (steps 10 and 30): 2000, 3000, 4000.
    assert "- median tokens/s (after the first window): 3,000" in text
    assert "45.0% (PaLM count), 40.0% (causal count)" in text
    assert "- peak device memory: 3.00 GiB (limit 8.00 GiB; NVML GPU memory used: n/a)" in text
    assert "- skipped steps (non-finite gradients): 2" in text
    assert "- rollbacks: 1" in text and "at step 40, back to step 30: the loss of step 40 is nan" in text
    assert "- restarts: 1" in text and "/runs/x/checkpoints/20" in text
    assert "Goodput 50.0% at step 50" in text
    assert "| setup | 10.0 | 10.0% |" in text and "| productive | 50.0 | 50.0% |" in text
    assert "| wall | 100.0 | 100.0% |" in text
    assert "- **data_wait**: the host is slow" in text
    assert "![loss_scale](loss_scale.png)" in text and "Not plotted" not in text
    scale = report.figures(report.load(run))["loss_scale"].axes[0]
    assert scale.get_yscale() == "log" and [line.get_xdata()[0] for line in scale.lines[1:]] == [30, 40]


def test_missing_plots_are_reported_and_stale_ones_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in report.PLOTS:  # an earlier report's plots
        (out / f"{name}.png").write_bytes(PNG)
    path = report.write(make_run(tmp_path / "cpu", CPU_RECORDS, config=False), out)
    assert sorted(p.name for p in out.glob("*.png")) == ["loss.png", "throughput.png"]
    text = path.read_text()
    assert "Not plotted: mfu (no data), memory (no data), loss_scale (1 throughout: no loss scaling)." in text
    assert "- median MFU (after the first window): n/a (PaLM count), n/a (causal count)" in text
    assert "- model:" not in text and "## Goodput" not in text


def test_history_with_nan_and_no_run_dir():
    history = [{"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": math.nan}, {"step": 2, "loss": 3.0}]
    figs = report.figures(history)
    assert list(figs) == ["loss"] and "loss_scale (no data)" in report.summary(None, history)
    assert list(figs["loss"].axes[0].lines[0].get_ydata()) == [3.0]
    assert "- loss: 3.0000 (step 2) -> 3.0000 (step 2)" in report.summary(None, history)
    assert "- non-finite loss (NaN or infinite) at 1 of 2 records: step 1" in report.summary(None, history)
    many = [{"step": s, "loss": math.inf} for s in range(7)]
    assert "at 7 of 7 records: step 0, 1, 2, 3, 4 and 2 more" in report.summary(None, many)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 1, "loss": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"loss": 1.0}', "without a step"),
        ('{"step": null}', "its step is None, not an integer"),
        ('{"step": -5, "loss": 1.0}', "its step is -5, not an integer >= 0"),
        (b"\xff\xfe", "not valid JSON"),
        ('{"step": 1, "loss": "low"}', "metrics key 'loss' holds 'low'"),
    ],
)
def test_bad_line_names_the_file_and_line(tmp_path, line, message):
    run = make_run(tmp_path / "run", RECORDS[:2], config=False)
    line = line if isinstance(line, bytes) else line.encode()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\n" + line + b"\n")  # a blank line 3 is skipped, but still counted
    with pytest.raises(report.ReportError, match=f"metrics.jsonl, line 4: .*{message}"):
        report.load(run)


def test_a_last_line_cut_short_is_left_out_with_a_warning(tmp_path, capsys):
    """A run that is writing its next record, or stopped while it was: the report covers the records before it."""
    run = make_run(tmp_path / "run", RECORDS[:3], config=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "loss": 2.')
    assert report.main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert "metrics.jsonl, line 4, the last, is cut short (no newline, not valid JSON): left out." in err
    assert "wrote " in out and [r["step"] for r in report.load(run, log=lambda line: None)] == [0, 10, 20]
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(report.ReportError, match="holds no records yet"):
        report.load(run)


def test_out_that_cannot_hold_the_report_is_an_error(tmp_path, capsys):
    run = make_run(tmp_path / "run", CPU_RECORDS, config=False)
    (tmp_path / "file").write_text("")
    for out, message in [
        (tmp_path / "file", f"the report's directory {tmp_path / 'file'} is a file"),
        (tmp_path / "file" / "sub", f"cannot be created: {tmp_path / 'file'} is not a directory"),
        ("", "--out is empty"),
    ]:
        assert report.main([str(run), f"--out={out}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_cli_writes_the_report(tmp_path, capsys):
    assert report.main([str(make_run(tmp_path / "run", CPU_RECORDS)), f"--out={tmp_path / 'out'}"]) == 0
    assert f"wrote {tmp_path / 'out' / 'summary.md'} and loss.png, throughput.png" in capsys.readouterr().out


def test_run_dir_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for run_dir, message in [(tmp_path / "file", "file is not a directory"), (tmp_path, "holds no metrics.jsonl")]:
        assert report.main([str(run_dir)]) == 2
        assert message in capsys.readouterr().err


def test_cli_errors_exit_2_without_traceback(tmp_path):
    bad = make_run(tmp_path / "bad", RECORDS[:3], config=False)
    with open(bad / "metrics.jsonl", "a") as f:
        f.write("{oops\n")
    cases = [
        (cli(tmp_path / "nowhere"), "nowhere does not exist"),
        (cli(bad), "metrics.jsonl, line 4: not valid JSON"),
        (cli(make_run(tmp_path / "good", RECORDS[:3]), block_matplotlib=True), "pip install matplotlib"),
    ]
    for process, message in cases:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 2, err
        assert message in err and "Traceback" not in err, err


def test_figures_and_summary_say_what_to_pass():
    with pytest.raises(report.ReportError, match=r"pass the records, not a path: load\('runs/x'\)"):
        report.figures("runs/x")
    with pytest.raises(report.ReportError, match="integer 'step'"):
        report.summary(None, [{"loss": 1.0}])
