"""Guard rails found in review: inputs that must stop with one clear message, and accounting details."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax as ds
from dsjax.config import ConfigError
from dsjax.precision import parse_policy
from dsjax.run import _mesh_peak
from dsjax.train import main

SMALL = ["--train.batch_size=8", "--train.seq_len=32", "--model.n_layers=1", "--model.d_model=32",
         "--model.n_heads=2", "--model.n_kv_heads=2", "--model.d_ff=64"]  # fmt: skip


def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_tokens_run_finishes_without_a_sample(capsys, tmp_path):
    np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint16).tofile(tmp_path / "all.bin")
    out = tmp_path / "run"
    code, stdout, _ = run_main(
        capsys,
        f"--out={out}",
        "--data.source=tokens",
        f"--data.path={tmp_path / 'all.bin'}",
        "--train.steps=2",
        "--train.sample_tokens=8",
        *SMALL,
    )
    assert code == 0 and "run directory:" in stdout and "sample:" not in stdout


def test_ids_outside_the_vocab_stop_before_the_run_directory_exists(capsys, tmp_path):
    np.full(20_000, 3000, dtype=np.uint16).tofile(tmp_path / "all.bin")
    out = tmp_path / "run"
    code, _, err = run_main(
        capsys, f"--out={out}", "--data.source=tokens", f"--data.path={tmp_path / 'all.bin'}", "--train.steps=2", *SMALL
    )
    assert code == 2 and "model.vocab_size = 256" in err and not out.exists()


def test_preflight_failure_leaves_no_run_directory(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, f"--out={out}", "--train.memory_budget_gb=0.00001", *SMALL)
    assert code == 2 and "KiB budget" in err and not out.exists()


def test_out_below_a_file_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(capsys, f"--out={tmp_path / 'file' / 'run'}", *SMALL)
    assert code == 2 and "is not a directory" in err


def test_cudnn_attention_on_cpu_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_main(capsys, f"--out={tmp_path / 'run'}", "--model.attention=cudnn", *SMALL)
    assert code == 2 and "model.attention='cudnn' needs a GPU" in err and "platform cpu" in err


def test_fp16_master_weights_are_refused():
    with pytest.raises(ConfigError, match="fp16 master weights are not supported"):
        parse_policy("p=f16,c=f16,o=f32")


def test_no_shardable_weight_under_fsdp_is_an_error(capsys, tmp_path):
    code, _, err = run_main(
        capsys,
        f"--out={tmp_path / 'run'}",
        "--model.family=gpt2",
        "--model.d_model=20",
        "--model.n_heads=2",
        "--model.n_kv_heads=2",
        "--model.d_ff=20",
        "--model.vocab_size=260",
        "--model.n_layers=1",
        "--train.batch_size=8",
        "--train.seq_len=32",
        "--mesh.fsdp=8",
    )
    assert code == 2 and "no weight can be split" in err and "d_model=20" in err


def test_mfu_peak_counts_every_device():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert _mesh_peak([h100] * 8, "bfloat16") == 8 * 989e12
    assert _mesh_peak(jax.devices(), "float32") is None


def test_seed_spelling_of_the_api():
    assert ds.amp.autocast is ds.autocast and ds.optim.GradientScaler is ds.GradientScaler
    with ds.amp.autocast(jnp.bfloat16):
        assert ds.amp.compute_dtype(jnp.float32) == jnp.bfloat16


def test_loss_chunk_must_divide_the_sequence():
    from dsjax.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.loss_chunk \(48\) must be 0 or divide train\.seq_len \(128\)"):
        TrainConfig(seq_len=128, loss_chunk=48)
    assert TrainConfig(seq_len=128, loss_chunk=32).loss_chunk == 32


def test_sample_checks_its_arguments_and_greedy_sampling_repeats():
    from dsjax.config import Config, DataConfig, ModelConfig, TrainConfig
    from dsjax.run import build, sample

    model = ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16)
    config = Config(model=model, data=DataConfig(source="default"), train=TrainConfig(batch_size=4, seq_len=16))
    run = build(config, devices=jax.devices()[:1])
    for args, message in [
        ((123, 5), r"prompt must be a string, got 123 \(int\)"),
        (("def ", -5), r"n_tokens must be an integer >= 0, got -5"),
        (("def ", 2.5), r"n_tokens must be an integer >= 0, got 2.5"),
        (("def ", 5, -1.0), r"temperature must be a finite number >= 0 \(0: greedy\), got -1.0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sample(run, *args)
    text = sample(run, "def ", 6, temperature=0)
    assert text.startswith("def ") and text == sample(run, "def ", 6, temperature=0, seed=1)
    assert sample(run, "def ", 0) == "def "
