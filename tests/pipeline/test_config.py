"""Run configs: YAML + overrides -> validated dataclasses; every error names its key."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, apply_overrides, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_says_how_to_run(path):
    text = path.read_text()
    if "\nsearch:" in text:  # a Tune search: the base run config + every corner of its space
        from pipeline.tune import load_tune_config

        assert load_tune_config(path).search.space
    else:
        assert load_config(path).run.name
    assert "Command" in text and "runtime" in text.lower(), f"{path} must state its command and runtime"


def test_overrides_parse_yaml_and_coerce_numbers():
    cfg = load_config(None, ["train.lr=3e-4", "model.routing_iterations=1", "train.epochs=2",
                             "model.decoder_hidden=[8, 16]", "run.use_gpu=false"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model["routing_iterations"] == 1
    assert cfg.model_config((1, 28, 28), 10).decoder_hidden == (8, 16)
    assert cfg.run.use_gpu is False


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.batch_size=64", "run.num_workers=2", "model.type=cnn"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_model_shape_comes_from_data_unless_set():
    cfg = load_config(None, [])
    assert cfg.model_config((3, 32, 32), 10).in_channels == 3
    cfg = load_config(None, ["model.image_size=36"])
    assert cfg.model_config((1, 28, 28), 10).image_size == 36


@pytest.mark.parametrize("overrides, key", [
    (["train.lrr=1"], "train.lrr"),
    (["optimizer.lr=1"], "optimizer"),
    (["model.routing_iteration=2"], "routing_iteration"),
    (["model.routing_iterations=0"], "routing_iterations"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["train.precision=fp8"], "train.precision"),
    (["model.type=resnet"], "model.type"),
    (["run.num_workers=3", "train.batch_size=128"], "train.batch_size"),
    (["run.name=a/b"], "run.name"),
    (["data.on_error=ignore"], "data.on_error"),
    (["model.reconstruction_weight=-1"], "reconstruction_weight"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
