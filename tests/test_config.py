"""dsjax.config and the device-count checks of dsjax.mesh: every validation rule, overrides, presets, help."""

import dataclasses
import json
import pathlib

import pytest

from dsjax.config import (
    PRESETS,
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    help_text,
    parse_value,
    preset,
    split_known,
)
from dsjax.mesh import check_config, resolve_degrees

VALUE_FLAGS = ("preset", "out", "cpu-devices")
SWITCHES = ("dry-run", "help")


def raises(fn, *fragments):
    """Call `fn`, require a ConfigError, and require every fragment in its message; returns the message."""
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------------
# model


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"family": "gpt3"}, ["model.family", "'gpt3'", "llama", "gpt2"]),
        ({"d_model": 130, "n_heads": 4}, ["model.d_model (130)", "model.n_heads (4)"]),
        ({"n_heads": 4, "n_kv_heads": 3}, ["model.n_heads (4)", "model.n_kv_heads (3)"]),
        ({"family": "gpt2", "n_heads": 4, "n_kv_heads": 2}, ["gpt2", "model.n_kv_heads (2)", "model.n_heads (4)"]),
        ({"family": "llama", "d_model": 12, "n_heads": 4}, ["llama", "12/4 = 3", "even"]),
        ({"attention": "flash"}, ["model.attention", "'flash'", "cudnn"]),
        ({"norm_eps": 0.0}, ["model.norm_eps", "0.0"]),
        ({"init_std": -0.02}, ["model.init_std", "-0.02"]),
    ],
    ids=[
        "family",
        "d_model%n_heads",
        "n_heads%n_kv_heads",
        "gpt2-mha",
        "llama-odd-head-dim",
        "attention",
        "norm_eps",
        "init_std",
    ],
)
def test_model_rules(kwargs, fragments):
    raises(lambda: ModelConfig(**kwargs), *fragments)


@pytest.mark.parametrize("name", ["n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"])
@pytest.mark.parametrize("value", [0, -3])
def test_model_sizes_must_be_positive(name, value):
    raises(lambda: ModelConfig(**{name: value}), f"model.{name}", "positive", str(value))


def test_model_valid_shapes_pass():
    gqa = ModelConfig(family="llama", d_model=64, n_heads=8, n_kv_heads=2)
    assert gqa.head_dim == 8
    # gpt2 has no RoPE, so an odd head dim is fine there.
    assert ModelConfig(family="gpt2", d_model=12, n_heads=4, n_kv_heads=4).head_dim == 3
    for impl in ("auto", "xla", "cudnn"):
        assert ModelConfig(attention=impl).attention == impl


@pytest.mark.parametrize("theta", [0.0, -10000.0])
def test_rope_theta_must_be_positive(theta):
    raises(lambda: ModelConfig(rope_theta=theta), "model.rope_theta", str(theta))


# ----------------------------------------------------------------------------------------------------
# mesh


@pytest.mark.parametrize("axis", ["data", "pipeline", "fsdp", "tensor"])
@pytest.mark.parametrize("value", [0, -2])
def test_mesh_degree_must_be_positive_or_rest(axis, value):
    kwargs = {axis: value} if axis == "fsdp" else {axis: value, "fsdp": 1}
    raises(lambda: MeshConfig(**kwargs), f"mesh.{axis}", f"got {value}", "-1")


def test_mesh_at_most_one_rest():
    raises(lambda: MeshConfig(data=-1, fsdp=-1), "at most one", "mesh.data, mesh.fsdp")
    raises(lambda: MeshConfig(tensor=-1), "mesh.fsdp, mesh.tensor")  # fsdp defaults to -1


def test_resolve_degrees_product_mismatch():
    mesh = MeshConfig(data=2, fsdp=2, tensor=1)
    raises(lambda: resolve_degrees(mesh, 8), "multiply to 4", "8 devices", "mesh.data=2", "mesh.fsdp=2")


def test_resolve_degrees_exact_product():
    assert resolve_degrees(MeshConfig(data=2, fsdp=2, tensor=2), 8) == {
        "data": 2,
        "pipeline": 1,
        "fsdp": 2,
        "tensor": 2,
    }


def test_resolve_degrees_rest_takes_the_remaining_devices():
    degrees = resolve_degrees(MeshConfig(data=2, fsdp=-1), 8)
    assert degrees == {"data": 2, "pipeline": 1, "fsdp": 4, "tensor": 1}
    assert list(degrees) == ["data", "pipeline", "fsdp", "tensor"]  # mesh-axis order
    assert resolve_degrees(MeshConfig(), 8)["fsdp"] == 8
    assert resolve_degrees(MeshConfig(data=8, fsdp=-1), 8)["fsdp"] == 1
    assert resolve_degrees(MeshConfig(fsdp=2, tensor=-1), 8)["tensor"] == 4


def test_resolve_degrees_rest_not_dividing():
    raises(lambda: resolve_degrees(MeshConfig(data=3, fsdp=-1), 8), "mesh.fsdp=-1", "multiply to 3", "8 devices")


# ----------------------------------------------------------------------------------------------------
# tensor degree vs the model


@pytest.mark.parametrize(
    "model, name, value",
    [
        (ModelConfig(n_heads=4, n_kv_heads=4), "n_heads", 4),  # tensor 3 below
        (ModelConfig(d_model=128, n_heads=4, n_kv_heads=1), "n_kv_heads", 1),
        (ModelConfig(d_ff=383), "d_ff", 383),
        (ModelConfig(vocab_size=255), "vocab_size", 255),
    ],
    ids=["heads", "kv_heads", "d_ff", "vocab"],
)
def test_tensor_degree_must_divide(model, name, value):
    tensor = 3 if name == "n_heads" else 2
    raises(
        lambda: Config(model=model, mesh=MeshConfig(fsdp=-1, tensor=tensor)),
        f"model.{name} ({value})",
        f"mesh.tensor ({tensor})",
    )


def test_tensor_degree_dividing_everything_passes():
    cfg = Config(mesh=MeshConfig(fsdp=2, tensor=4))
    assert check_config(cfg, 8) == {"data": 1, "pipeline": 1, "fsdp": 2, "tensor": 4}


def test_tensor_rest_is_checked_once_resolved():
    cfg = Config(mesh=MeshConfig(fsdp=1, tensor=-1))  # the dataclass only sees -1
    raises(lambda: check_config(cfg, 8), "model.n_heads (4)", "mesh.tensor (8)")
    assert check_config(cfg, 4)["tensor"] == 4


# ----------------------------------------------------------------------------------------------------
# cross-section and device-count rules


def test_batch_must_divide_over_data_and_fsdp():
    raises(lambda: check_config(Config(train=TrainConfig(batch_size=12)), 8), "train.batch_size (12)", "1 x 8 = 8")
    cfg = Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2), train=TrainConfig(batch_size=6))
    raises(lambda: check_config(cfg, 8), "train.batch_size (6)", "2 x 2 = 4")
    # tensor does not split the batch: 4 sequences over data x fsdp = 4 is fine.
    ok = Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2), train=TrainConfig(batch_size=4))
    assert check_config(ok, 8) == {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}


def test_check_config_reports_mesh_mismatch():
    raises(lambda: check_config(Config(mesh=MeshConfig(data=3, fsdp=1)), 8), "multiply to 3", "8 devices")


def test_seq_len_within_max_seq_len():
    raises(lambda: Config(train=TrainConfig(seq_len=512)), "train.seq_len (512)", "model.max_seq_len (256)")
    assert Config(train=TrainConfig(seq_len=256)).train.seq_len == 256


def test_pipeline_degree_is_checked_against_the_layers():
    cfg = Config(mesh=MeshConfig(pipeline=-1, fsdp=1))  # tiny: 4 layers
    raises(lambda: check_config(cfg, 8), "model.n_layers (4)", "mesh.pipeline x pipeline.repeats = 8 x 1")
    assert check_config(cfg, 4)["pipeline"] == 4
    assert check_config(cfg, 1)["pipeline"] == 1


# ----------------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_data_file_sources_need_a_path(source):
    raises(lambda: DataConfig(source=source), f"data.source={source!r}", "data.path")
    assert DataConfig(source=source, path="corpus.txt").path == "corpus.txt"


def test_data_source_unknown():
    raises(lambda: DataConfig(source="web"), "data.source", "'web'", "synthetic")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_range(fraction):
    raises(lambda: DataConfig(val_fraction=fraction), "data.val_fraction", str(fraction))


# ----------------------------------------------------------------------------------------------------
# train


@pytest.mark.parametrize(
    "name, value",
    [
        ("steps", 0),
        ("batch_size", 0),
        ("seq_len", -1),
        ("log_every", 0),
        ("eval_batches", 0),
        ("warmup_steps", -1),
        ("eval_every", -1),
        ("sample_tokens", -5),
        ("lr", 0.0),
        ("lr", -0.001),
        ("min_lr_ratio", 1.5),
        ("min_lr_ratio", -0.1),
        ("weight_decay", -0.1),
        ("grad_clip", -1.0),
        ("beta1", 1.0),
        ("beta1", -0.1),
        ("beta2", 1.5),
        ("eps", 0.0),
    ],
)
def test_train_ranges(name, value):
    raises(lambda: TrainConfig(**{name: value}), f"train.{name}", str(value))


def test_train_boundaries_accepted():
    t = TrainConfig(
        grad_clip=0.0,
        beta1=0.0,
        beta2=0.0,
        warmup_steps=0,
        eval_every=0,
        sample_tokens=0,
        min_lr_ratio=1.0,
        weight_decay=0.0,
        steps=1,
    )
    assert (t.grad_clip, t.beta1, t.warmup_steps, t.eval_every, t.sample_tokens) == (0.0, 0.0, 0, 0, 0)
    assert TrainConfig(min_lr_ratio=0.0).min_lr_ratio == 0.0


@pytest.mark.parametrize("key", ["train.lr", "model.norm_eps", "train.weight_decay"])
def test_infinite_floats_rejected(key):
    raises(lambda: apply_overrides(Config(), {key: "inf"}), key, "inf")


def test_nan_floats_rejected():
    raises(lambda: apply_overrides(Config(), {"train.lr": "nan"}), "train.lr", "nan")
    raises(lambda: apply_overrides(Config(), {"train.beta1": "nan"}), "train.beta1", "nan")


# ----------------------------------------------------------------------------------------------------
# overrides


def test_apply_overrides_types_each_kind():
    cfg = apply_overrides(
        Config(),
        {
            "train.steps": "1_000",
            "train.lr": "1e-3",
            "train.grad_clip": "2",
            "model.tie_embeddings": "true",
            "model.family": "gpt2",
            "data.source": "text",
            "data.path": "some/dir",
            "mesh.fsdp": "-1",
        },
    )
    assert cfg.train.steps == 1000 and type(cfg.train.steps) is int
    assert cfg.train.lr == 0.001 and type(cfg.train.lr) is float
    assert cfg.train.grad_clip == 2.0 and type(cfg.train.grad_clip) is float
    assert cfg.model.tie_embeddings is True
    assert cfg.model.family == "gpt2" and cfg.data.path == "some/dir" and cfg.mesh.fsdp == -1
    # untouched fields keep the base config's values
    assert cfg.train.batch_size == Config().train.batch_size and cfg.model.d_model == Config().model.d_model
    assert Config().train.steps == 200  # the base is not modified


@pytest.mark.parametrize("text", ["1", "true", "True", "YES", "on", " yes "])
def test_bool_true_spellings(text):
    assert parse_value("model.tie_embeddings", text) is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", "no", "Off"])
def test_bool_false_spellings(text):
    assert parse_value("model.tie_embeddings", text) is False


@pytest.mark.parametrize(
    "key, text, described",
    [
        ("train.steps", "abc", "an integer"),
        ("train.steps", "3.5", "an integer"),
        ("train.lr", "fast", "a finite number"),
        ("model.tie_embeddings", "maybe", "a boolean"),
    ],
)
def test_override_wrong_type(key, text, described):
    raises(lambda: apply_overrides(Config(), {key: text}), f"--{key}", described, repr(text))


def test_override_invalid_value_is_validated():
    raises(lambda: apply_overrides(Config(), {"train.steps": "0"}), "train.steps", "0")
    raises(lambda: apply_overrides(Config(), {"model.n_kv_heads": "3"}), "model.n_kv_heads (3)")


def test_override_unknown_section_hint():
    raises(lambda: apply_overrides(Config(), {"trian.steps": "3"}), "--trian.steps", "did you mean --train.steps")
    msg = raises(lambda: apply_overrides(Config(), {"zzz.steps": "3"}), "--zzz.steps", "model, mesh, train, data")
    assert "did you mean" not in msg


def test_override_unknown_field_hint():
    raises(lambda: apply_overrides(Config(), {"train.stpes": "3"}), "--train.stpes", "did you mean --train.steps")
    raises(lambda: parse_value("model.dmodel", "3"), "did you mean --model.d_model")
    # without a close match, the section's fields are listed
    raises(lambda: apply_overrides(Config(), {"mesh.qqqqq": "3"}), "--mesh.qqqqq", "data, pipeline, fsdp, tensor")


def test_split_known_forms():
    top, overrides = split_known(
        [
            "--preset=tiny",
            "--train.steps=5",
            "--train.lr",
            "0.1",
            "--dry-run",
            "--mesh.fsdp",
            "-1",
            "--help",
            "--out",
            "d",
        ],
        VALUE_FLAGS,
        SWITCHES,
    )
    assert top == {"preset": "tiny", "dry-run": None, "help": None, "out": "d"}
    assert overrides == {"train.steps": "5", "train.lr": "0.1", "mesh.fsdp": "-1"}
    assert split_known([], VALUE_FLAGS, SWITCHES) == ({}, {})
    assert split_known(["--data.path=a=b"], VALUE_FLAGS, SWITCHES) == (
        {},
        {"data.path": "a=b"},
    )  # split at the first '='


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train.steps=5"], ["unexpected argument", "'train.steps=5'"]),
        (["--train.steps=5", "extra"], ["unexpected argument", "'extra'"]),
        (["--"], ["unexpected argument", "'--'"]),
        (["-x"], ["unexpected argument", "'-x'"]),
        (["--outt=x"], ["unknown option --outt", "did you mean --out?", "--preset"]),
        (["--verbose"], ["unknown option --verbose", "--section.field=value"]),
        (["--train.steps"], ["--train.steps needs a value"]),
        (["--train.steps", "--dry-run"], ["--train.steps needs a value"]),
        (["--train.stpes=4"], ["--train.stpes", "did you mean --train.steps"]),
        (["--dry-run=yes"], ["--dry-run takes no value"]),
        (["--out="], ["--out needs a value"]),
        (["--preset"], ["--preset needs a value"]),
    ],
)
def test_split_known_rejects(argv, fragments):
    raises(lambda: split_known(argv, VALUE_FLAGS, SWITCHES), *fragments)


# ----------------------------------------------------------------------------------------------------
# presets, serialisation, help


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_validates(name):
    cfg = preset(name)
    assert isinstance(cfg, Config)
    degrees = check_config(cfg, 8)
    assert degrees["data"] * degrees["pipeline"] * degrees["fsdp"] * degrees["tensor"] == 8
    assert cfg.train.seq_len <= cfg.model.max_seq_len


def test_preset_names():
    assert set(PRESETS) == {"tiny", "gpt2-124m", "llama-1b", "llama-7b"}
    assert preset("tiny") == Config()


def test_gpt2_124m_shape():
    m = preset("gpt2-124m").model
    assert (m.family, m.n_layers, m.d_model, m.n_heads, m.n_kv_heads) == ("gpt2", 12, 768, 12, 12)
    assert (m.d_ff, m.vocab_size, m.max_seq_len, m.tie_embeddings) == (3072, 50304, 1024, True)
    assert preset("gpt2-124m").train.seq_len == 1024


def test_llama_presets_shape():
    m = preset("llama-1b").model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size) == (16, 2048, 32, 8, 8192, 128256)
    m = preset("llama-7b").model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size) == (32, 4096, 32, 32, 11008, 32000)


def test_unknown_preset_lists_names():
    raises(lambda: preset("nope"), "'nope'", *PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name):
    cfg = apply_overrides(preset(name), {"train.seed": "7", "data.val_fraction": "0.05"})
    tree = json.loads(cfg.to_json())
    assert set(tree) == set(SECTIONS)
    assert tree["train"]["seed"] == 7
    again = Config.from_dict(tree)
    assert again == cfg and again is not cfg


def test_from_dict_partial_uses_defaults():
    cfg = Config.from_dict({"train": {"steps": 7}})
    assert cfg.train.steps == 7 and cfg.model == ModelConfig() and cfg.mesh == MeshConfig()


def test_from_dict_rejects_unknown():
    raises(lambda: Config.from_dict({"optim": {}}), "'optim'", "unknown config section")
    raises(lambda: Config.from_dict({"train": {"stpes": 3}}), "train.stpes")


def test_from_dict_validates():
    raises(lambda: Config.from_dict({"train": {"steps": 0}}), "train.steps", "0")


def test_from_dict_wrong_type_is_a_config_error():
    raises(lambda: Config.from_dict({"train": {"steps": "5"}}), "train.steps")


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda: MeshConfig(data="2"), ["mesh.data must be an integer, got '2' (str)"]),
        (lambda: TrainConfig(steps=40.5), ["train.steps must be an integer, got 40.5 (float)"]),
        (lambda: TrainConfig(steps=True), ["train.steps must be an integer, got True (bool)"]),
        (lambda: TrainConfig(lr=float("inf")), ["train.lr must be a finite number, got inf"]),
        (lambda: dataclasses.replace(ModelConfig(), d_model="64"), ["model.d_model must be an integer"]),
        (lambda: CheckpointConfig(enabled="yes"), ["checkpoint.enabled must be a boolean"]),
        (lambda: Config(mesh={"data": 2}), ["Config.mesh must be a MeshConfig, got {'data': 2} (dict)", "from_dict"]),
    ],
)
def test_python_callers_get_the_field_and_value_of_a_wrong_type(make, fragments):
    """The notebook API: a value of the wrong type is named before any check compares it with a number."""
    raises(make, *fragments)
    assert TrainConfig(lr=1).lr == 1  # an int where a float is due


def test_numpy_scalars_and_paths_become_plain_values():
    import numpy as np

    train = TrainConfig(steps=np.int64(40), batch_size=np.int32(8), lr=np.float32(0.5))
    assert (train.steps, train.batch_size, train.lr) == (40, 8, 0.5)
    assert [type(v) for v in (train.steps, train.batch_size, train.lr)] == [int, int, float]
    assert json.loads(Config(train=train).to_json())["train"]["steps"] == 40
    raises(lambda: TrainConfig(steps=np.float64(40.5)), "train.steps must be an integer")
    assert DataConfig(source="text", path=pathlib.Path("/data/x")).path == "/data/x"  # a path field takes a Path


def _help_line(text: str, section: str, name: str) -> str:
    prefix = f"  --{section}.{name}="
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r} appears {len(lines)} times"
    return lines[0]


def test_help_text_lists_every_field():
    text = help_text()
    for section, section_cls in SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(section_cls):
            line = _help_line(text, section, f.name)
            assert f.metadata["doc"], f"{section}.{f.name} has no doc"
            assert line.endswith(f.metadata["doc"])
            assert f"--{section}.{f.name}={f.default!r}" in line


def test_help_text_uses_given_defaults():
    text = help_text(preset("gpt2-124m"))
    assert "--model.d_model=768 " in _help_line(text, "model", "d_model")
    assert "--model.family='gpt2'" in _help_line(text, "model", "family")
    assert "--train.seq_len=1024 " in _help_line(text, "train", "seq_len")
