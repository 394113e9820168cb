"""Issue 18's defects of the run config, the resume rules and the train CLI (each failed
before its fix), and the rules that replaced hand lists: resume safety is a property of the
field, the registry switch is one rule for --set and Tune, the model section is capscore's
own config object."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from capscore import CapsNetConfig, DynamicRoutingConfig, UniformRoutingConfig
from pipeline.cli import main
from pipeline.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_run_config,
    resume_safe_keys,
)
from pipeline.train.loop import run_dir_for
from pipeline.train.resume import CONFIG_FILE, config_diff, plan_resume
from pipeline.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


# --- resume after an upgrade ----------------------------------------------------------------


def _plan(cfg):
    """plan_resume as `capsnet train --local` calls it: workers resolved, data filled."""
    from pipeline.train.trainer import resolve_workers

    return plan_resume(
        resolve_workers(cfg, local=True)[0].for_data((1, 12, 12), 10), run_dir_for(cfg)
    )


def _finished_run(tiny_shards, tiny_config, tmp_path, *extra):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1", *extra)
    train(cfg, local=True)
    return cfg


def test_a_run_saved_before_new_keys_existed_resumes(tiny_shards, tiny_config, tmp_path, capsys):
    """config.yaml written by an older version lacks keys added later: they mean the
    default, and the rerun says which were filled."""
    cfg = _finished_run(tiny_shards, tiny_config, tmp_path)
    path = run_dir_for(cfg) / CONFIG_FILE
    saved = yaml.safe_load(path.read_text())
    del saved["data"]["handoff_samples"], saved["data"]["persistent_workers"]
    del saved["train"]["compile"]
    path.write_text(yaml.safe_dump(saved))
    longer = tiny_config(tiny_shards, tmp_path, "train.epochs=2")
    plan = _plan(longer)
    assert plan.state == "resume" and plan.diff == []
    assert plan.filled == ["data.handoff_samples", "data.persistent_workers", "train.compile"]
    capsys.readouterr()
    train(longer, local=True)
    out = capsys.readouterr().out
    assert "filled with today's defaults: data.handoff_samples" in out
    assert "resuming tiny at epoch 1" in out


def test_a_missing_key_with_another_value_than_the_default_is_still_a_change():
    old = {"train": {"epochs": 2}}  # an old config: batch_size absent = its default, 128
    new = parse_run_config({"train": {"epochs": 2, "batch_size": 64}}).to_dict()
    assert [k for k, *_ in config_diff(parse_run_config(old).to_dict(), new)] == [
        "train.batch_size"
    ]


# --- resume safety is a property of the field -------------------------------------------------


def test_resume_safe_keys_are_derived_from_the_fields():
    safe = resume_safe_keys()
    # the two the hand list forgot, and the others it had
    for key in ("data.persistent_workers", "data.handoff_samples", "train.epochs", "debug.*"):
        assert key in safe
    for key in ("train.lr", "train.batch_size", "data.shards", "model.*", "train.seed"):
        assert not any(s == key or s.startswith(key.rstrip("*")) for s in safe), key


@pytest.mark.parametrize("key", ["data.persistent_workers=false", "data.handoff_samples=512"])
def test_loader_settings_change_on_resume_without_asking(tiny_shards, tiny_config, tmp_path, key):
    _finished_run(tiny_shards, tiny_config, tmp_path)
    longer = tiny_config(tiny_shards, tmp_path, "train.epochs=2", key)
    plan = _plan(longer)
    assert plan.state == "resume" and plan.diff == []


# --- one registry-switch rule ---------------------------------------------------------------


def test_set_routing_name_replaces_the_files_routing_with_the_algorithms_defaults():
    cfg = load_config(SMOKE, ["model.routing.name=uniform"])
    assert cfg.model.routing == UniformRoutingConfig()
    assert cfg.model.conv1_channels == 64  # the rest of the file's model stays
    back = load_config(SMOKE, ["model.routing.name=dynamic"])
    assert back.model.routing == DynamicRoutingConfig(iterations=3)


def test_set_a_key_the_chosen_algorithm_lacks_names_its_keys():
    with pytest.raises(ConfigError, match=r"model\.routing\.iterations.*'uniform'.*keys: name"):
        load_config(SMOKE, ["model.routing.name=uniform", "model.routing.iterations=2"])


# --- --resume-from is checked before Ray ------------------------------------------------------


def test_missing_resume_from_fails_the_dry_run(tiny_shards, tmp_path, capsys):
    args = ["train", "--set", "model.preset=tiny", "--set", f"data.shards={tiny_shards}"]
    args += ["--set", f"run.storage_path={tmp_path}", "--resume-from", str(tmp_path / "missing")]
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "resume" in err and "missing" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the error, and the CAPSNET_DEBUG hint


# --- errors name where a value came from ----------------------------------------------------


def test_errors_from_set_are_not_blamed_on_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["train.lr=abc"])
    assert str(err.value).startswith("--set train.lr:"), str(err.value)
    assert "smoke.yaml" not in str(err.value)


def test_errors_from_the_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml: train\.lr:"):
        load_config(bad, ["train.epochs=2"])


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.lrr=1", "lr"),
        ("data.shard=x", "shards"),
        ("model.conv1_channel=8", "conv1_channels"),
    ],
)
def test_unknown_keys_get_a_did_you_mean(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(None, [override])


# --- --print-config -------------------------------------------------------------------------


def test_print_config_shows_the_expanded_model_and_no_debug_section(capsys):
    assert main(["train", "--config", str(SMOKE), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "debug" not in printed
    model = printed["model"]
    assert model["routing"] == {
        "name": "dynamic",
        "iterations": 3,
        "detach_inner": False,
        "bias": False,
    }
    assert model["class_dim"] == 16 and model["m_pos"] == 0.9  # preset fields, not only given ones
    assert parse_run_config(printed).model == load_config(SMOKE).model


# --- one typed config: the model section is capscore's object ---------------------------------


def test_the_model_section_is_capscores_config_object():
    cfg = load_config(None, ["model.preset=tiny", "model.routing.iterations=2"])
    assert type(cfg.model) is CapsNetConfig
    assert cfg.model == CapsNetConfig.tiny(image_size=12, routing={"iterations": 2})


def test_data_fills_the_shape_unless_given_and_round_trips():
    cfg = load_config(None, ["model.preset=tiny"])
    filled = cfg.for_data((3, 16, 16), 7)
    assert (filled.model.in_channels, filled.model.image_size, filled.model.num_classes) == (
        3,
        16,
        16,
        7,
    )[:1] + (16, 7)
    assert parse_run_config(filled.to_dict()) == filled
    assert parse_run_config(cfg.to_dict()).for_data((3, 16, 16), 7) == filled  # still from data
    given = load_config(None, ["model.preset=tiny", "model.image_size=14"]).for_data(
        (1, 16, 16), 10
    )
    assert given.model.image_size == 14  # an explicit value wins over the data


def test_replace_keeps_the_model_and_what_comes_from_the_data():
    cfg = load_config(None, ["model.preset=tiny"])
    again = cfg.replace(run={"name": "other"})
    assert again.run.name == "other" and again.model == cfg.model
    assert again.for_data((1, 20, 20), 10).model.image_size == 20


def test_the_run_config_is_picklable_for_ray():
    import pickle

    cfg = load_config(SMOKE).for_data((1, 28, 28), 10)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# --- run.num_workers: auto --------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpus, use_gpu, expected", [(8, "auto", 8), (0, "auto", 1), (2, False, 1), (1, True, 1)]
)
def test_num_workers_auto_is_every_local_gpu_else_one(monkeypatch, gpus, use_gpu, expected):
    from pipeline.train import trainer

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(trainer, "_local_gpus", lambda: gpus)
    cfg = load_config(None, ["run.num_workers=auto", f"run.use_gpu={str(use_gpu).lower()}"])
    resolved, note = trainer.resolve_workers(cfg)
    assert resolved.run.num_workers == expected
    assert f"{expected} worker" in note


def test_num_workers_auto_on_a_cluster_is_not_guessed(monkeypatch):
    from pipeline.train import trainer

    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"run\.num_workers=auto.*RAY_ADDRESS"):
        trainer.resolve_workers(load_config(None, ["run.num_workers=auto"]))


def test_auto_workers_and_global_batch_split_checked_when_resolved(monkeypatch):
    from pipeline.train import trainer

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(trainer, "_local_gpus", lambda: 3)
    cfg = load_config(None, ["run.num_workers=auto", "train.batch_size=128"])
    with pytest.raises(ConfigError, match=r"train\.batch_size.*3"):
        trainer.resolve_workers(cfg)


@pytest.mark.parametrize("name", ["mnist.yaml", "mnist-cnn.yaml", "smoke.yaml"])
def test_train_configs_default_to_auto_workers(name):
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert raw.get("run", {}).get("num_workers", "auto") == "auto"
    assert RunConfig().run.num_workers == "auto"


def test_batch_sizes_have_one_meaning():
    cfg = load_config(None, ["train.batch_size=64", "train.eval_batch_size=250"])
    assert cfg.train.local_batch_size(4) == 16
    assert cfg.train.local_eval_batch_size(4) == 63  # ceil: the split never changes a result
    with pytest.raises(ValueError, match="batch_size"):
        cfg.train.local_batch_size(3)


# --- declared dependencies --------------------------------------------------------------------


def test_every_imported_distribution_is_declared():
    """Every third-party module capscore/ and pipeline/ import comes from a distribution that
    pyproject.toml declares (a dependency or an extra), not from whatever Ray pulls in."""
    import ast
    import re
    import sys
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    dists = packages_distributions()
    missing = {}
    for path in [*ROOT.glob("capscore/**/*.py"), *ROOT.glob("pipeline/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in ("capscore", "pipeline"):
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not owners & names:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# --- users' configs keep working ------------------------------------------------------------

OLD_STYLE = """
data: {shards: shards/smoke, loader_workers: 1}
model:
  type: capsnet
  preset: tiny
  routing: {iterations: 2}
train: {batch_size: 64, epochs: 2, lr: 2.0e-3}
run: {name: smoke, num_workers: 1, max_failures: 0}
"""


def test_configs_written_before_the_typed_model_still_load(tmp_path):
    """No YAML or --set key changed meaning (no deprecations needed): a config in the old
    style (a preset plus a few fields, an explicit worker count) loads to the same model as
    the same settings written out in full."""
    path = tmp_path / "old.yaml"
    path.write_text(OLD_STYLE)
    old = load_config(path)
    assert old.run.num_workers == 1 and old.train.batch_size == 64
    full = parse_run_config(old.for_data((1, 12, 12), 10).to_dict())
    assert "preset" not in full.to_dict()["model"]
    assert full.model == old.for_data((1, 12, 12), 10).model
    assert full.model == CapsNetConfig.tiny(routing={"iterations": 2})


def test_search_errors_from_set_are_not_blamed_on_the_file():
    from pipeline.tune import load_tune_config

    with pytest.raises(ConfigError) as err:
        load_tune_config(ROOT / "configs" / "tune-smoke.yaml", ["train.lrr=1"])
    assert str(err.value).startswith("--set train.lrr: unknown key (did you mean 'lr'?)")
