"""Run configs: YAML + overrides -> one validated, typed object; every error names its key."""

from pathlib import Path

import pytest

from capscore import MODELS, CapsNetConfig
from pipeline.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    apply_overrides,
    load_config,
    parse_run_config,
)

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_says_how_to_run(path):
    text = path.read_text()
    if "\nsearch:" in text:  # a Tune search: the base run config + every corner of its space
        from pipeline.tune import load_tune_config

        assert load_tune_config(path).search.space
    else:
        assert load_config(path).run.name
    assert "Command" in text and "runtime" in text.lower(), (
        f"{path} must state its command and runtime"
    )
    assert "# Expected result:" in text, (
        f"{path} must state its expected result (or 'not measured')"
    )


def test_overrides_parse_yaml_and_coerce_numbers():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.routing.iterations=1",
            "train.epochs=2",
            "model.decoder_hidden=[8, 16]",
            "run.use_gpu=false",
            "model.reconstruction_weight=5e-4",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    model = cfg.build_model_config((1, 28, 28), 10)
    assert model.routing.iterations == 1 and model.decoder_hidden == (8, 16)
    assert model.reconstruction_weight == pytest.approx(5e-4)  # '5e-4' is a string in YAML 1.1
    assert cfg.run.use_gpu is False


def test_round_trip_through_dict():
    cfg = load_config(
        None,
        [
            "train.batch_size=64",
            "run.num_workers=2",
            "model.type=cnn",
            "model.preset=tiny",
            "model.fc_hidden=[4, 4]",
        ],
    )
    again = parse_run_config(cfg.to_dict())
    assert again == cfg
    # written out in full (the preset kept while the data fields still come from it)
    assert again.to_dict()["model"] == {
        "type": "cnn",
        "preset": "tiny",
        "conv_channels": [8, 8, 4],
        "conv_kernel": 3,
        "fc_hidden": [4, 4],
        "dropout": 0.5,
    }


def test_model_shape_comes_from_data_unless_set():
    cfg = load_config(None, [])
    assert cfg.build_model_config((3, 32, 32), 10).in_channels == 3
    cfg = load_config(None, ["model.image_size=36"])
    assert cfg.build_model_config((1, 28, 28), 10).image_size == 36


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_family_and_preset_is_a_config_choice(kind):
    for preset in MODELS[kind].presets:
        cfg = load_config(None, [f"model.type={kind}", f"model.preset={preset}"])
        config = cfg.build_model_config()
        assert config == MODELS[kind].make_config(preset)


def test_preset_tiny_replaces_restated_fields():
    cfg = load_config(None, ["model.preset=tiny", "model.routing.iterations=2"])
    expected = CapsNetConfig.tiny(image_size=28, routing={"iterations": 2})
    assert cfg.build_model_config((1, 28, 28), 10) == expected


def test_data_section_is_the_loader_config():
    """One definition: the run config's data section is the object make_loader takes."""
    assert RunConfig.model_fields["data"].annotation is DataConfig
    assert DataConfig().shuffle_buffer == load_config(None).data.shuffle_buffer


# --- defects the untyped hand-offs let in (each failed before the typed config) -------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.augment=flase", "data.augment"),  # a typo used to turn augmentation on
        ("train.compile=maybe", "train.compile"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.batch_size=64.0", "train.batch_size"),
        ("data.loader_workers=1.5", "data.loader_workers"),
        ("model.decoder_hidden=512", "model.decoder_hidden"),  # used to be a raw TypeError
        ("data.shuffle_buffer=0", "data.shuffle_buffer"),  # passed here, failed on every worker
    ],
)
def test_wrong_types_and_loader_values_fail_here_with_the_key_and_value(override, key):
    value = override.split("=", 1)[1]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key}:" in str(err.value) and value in str(err.value)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "data.augment=flase",
                "train.epochs=2.5",
                "model.decoder_hidden=512",
                "run.num_workers=0",
                "train.nope=1",
            ],
        )
    assert err.value.lines and len(err.value.lines) == 5
    for key in (
        "data.augment",
        "train.epochs",
        "model.decoder_hidden",
        "run.num_workers",
        "train.nope",
    ):
        assert key in str(err.value)


# For every section: a wrong type, a bad value and an unknown key, each named by its dotted key.
ERROR_TABLE = [
    ("data", "data.augment=1", "data.augment"),
    ("data", "data.on_error=ignore", "data.on_error"),
    ("data", "data.shard=x", "data.shard"),
    ("model", "model.class_dim=true", "model.class_dim"),
    ("model", "model.reconstruction_weight=-1", "reconstruction_weight"),
    ("model", "model.routing_iteration=2", "model.routing_iteration"),
    ("model", "model.routing.iterations=0", "routing.iterations"),
    ("model", "model.routing.name=emm", "model.routing.name"),
    ("model", "model.routing.iteration=2", "model.routing.iteration"),
    ("model", "model.type=resnet", "model.type"),
    ("model", "model.preset=huge", "model.preset"),
    ("train", "train.lr=abc", "train.lr"),
    ("train", "train.lr=0", "train.lr"),
    ("train", "train.precision=fp8", "train.precision"),
    ("train", "train.lrr=1", "train.lrr"),
    ("run", "run.num_workers=two", "run.num_workers"),
    ("run", "run.name=a/b", "run.name"),
    ("run", "run.use_gpu=yes please", "run.use_gpu"),
    ("run", "run.workers=2", "run.workers"),
    ("debug", "debug.crash_once_at_epoch=x", "debug.crash_once_at_epoch"),
    ("debug", "debug.crash=1", "debug.crash"),
    ("config", "optimizer.lr=1", "optimizer"),
]


@pytest.mark.parametrize("section, override, key", ERROR_TABLE, ids=[r[1] for r in ERROR_TABLE])
def test_error_table(section, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_batch_size_must_split_over_workers():
    with pytest.raises(ConfigError, match=r"train\.batch_size.*run\.num_workers=3"):
        load_config(None, ["run.num_workers=3", "train.batch_size=128"])


def test_cli_config_errors_exit_2_before_ray(capsys):
    from pipeline.cli import main

    assert main(["train", "--set", "data.augment=flase", "--set", "train.epochs=2.5"]) == 2
    err = capsys.readouterr().err
    assert "data.augment" in err and "train.epochs" in err and "Traceback" not in err


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["lr"])


def test_set_reaches_dotted_keys_inside_search_space():
    raw = apply_overrides(
        {"search": {"space": {}}},
        [
            "search.space.train.lr={loguniform: [1e-4, 1e-2]}",
            "search.space.model.routing.iterations={choice: [1, 3]}",
        ],
    )
    assert raw["search"]["space"] == {
        "train.lr": {"loguniform": ["1e-4", "1e-2"]},
        "model.routing.iterations": {"choice": [1, 3]},
    }


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*line"):
        load_config(bad)


def test_train_print_config_and_dry_run(tiny_shards, tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    args = [
        "train",
        "--set",
        "model.preset=tiny",
        "--set",
        f"data.shards={tiny_shards}",
        "--set",
        f"run.storage_path={tmp_path}",
    ]
    assert main([*args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["preset"] == "tiny" and printed["model"]["conv1_channels"] == 8
    assert parse_run_config(printed) == load_config(None, [a for a in args[1:] if a != "--set"])
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would start a new run" in out and "320 train / 80 eval" in out
    assert not (tmp_path / "capsnet").exists()  # a dry run writes nothing
