"""capsnet report (issue 12): every figure and table from tiny untrained checkpoints (fast tier:
no training, no Ray), sections skipped with a reason where they do not apply, and one-line
errors for input that does not fit."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image

from capscore import ROUTINGS, CapsNet, CapsNetConfig, build_model
from pipeline import figures
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import load_dataset_info, open_loader
from pipeline.report import SECTIONS
from pipeline.report import sections as S
from pipeline.train.checkpoint import TrainState

SMALL = ["--samples", "4", "--eval-samples", "40", "--batch-size", "50", "--device", "cpu"]


def save_checkpoint(folder, shards, *overrides):
    """folder/checkpoint.pt of an untrained tiny model sized for `shards`."""
    cfg = load_config(None, ["model.preset=tiny", f"data.shards={shards}", *overrides])
    info = load_dataset_info(shards)
    model = build_model(cfg.build_model_config(info.image_shape, info.num_classes))
    state = TrainState.create(model, cfg.train, torch.device("cpu"))
    state.save(folder, run_config=cfg.to_dict(), metrics={})
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_shards, multimnist_shards, affine_shards):
    root = tmp_path_factory.mktemp("report-ckpt")
    out = {}
    for name, shards in (("tiny", tiny_shards), ("multi", multimnist_shards)):
        out[name] = save_checkpoint(root / name, shards)
    for name, shards in (("tiny", tiny_shards), ("affine", affine_shards)):
        out[f"{name}-cnn"] = save_checkpoint(root / f"{name}-cnn", shards, "model.type=cnn")
    out["affine"] = save_checkpoint(root / "affine", affine_shards)
    return out


def report(tmp_path, checkpoint, shards, *extra):
    out = tmp_path / "report"
    args = ["report", "--checkpoint", str(checkpoint), "--shards", str(shards), "--out", str(out)]
    assert main([*args, *SMALL, *extra]) == 0
    return out, (out / "report.md").read_text()


def section(text: str, title: str) -> str:
    """The markdown of one `## title` section."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first table whose header begins with `| header_start`."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def assert_finite(out, text):
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE)

    def walk(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(json.loads((out / "report.json").read_text()))


def png_size(path):
    with Image.open(path) as img:
        return img.size


def test_capsnet_with_baseline_on_single_object_data(tmp_path, checkpoints, tiny_shards, capsys):
    out, text = report(
        tmp_path, checkpoints["tiny"], tiny_shards, "--baseline", str(checkpoints["tiny-cnn"])
    )
    progress = capsys.readouterr().out
    for s in SECTIONS:
        assert f"report: {s.name} done in" in progress
    # The command that made every number heads the report, with every option spelt out.
    command = re.search(r"```\n(capsnet report .*)\n```", text).group(1)
    assert f"--checkpoint {checkpoints['tiny']}" in command and "--samples 4" in command
    assert "--baseline" in command and f"--out {out}" in command
    assert_finite(out, text)

    cfg = CapsNetConfig.tiny()
    for name in ("reconstructions", "perturbation-0", "perturbation-2", "overlapping"):
        assert (out / f"{name}.png").exists() == (name != "overlapping")
    assert png_size(out / "reconstructions.png") == figures.image_grid_size(2, 4)
    assert png_size(out / "perturbation-0.png") == figures.image_grid_size(cfg.class_dim, 11)
    for name in ("confusion-0", "confusion-1", "equivariance", "couplings"):
        assert png_size(out / f"{name}.png")[0] > 100

    accuracy = table_rows(section(text, "Accuracy"), "model")
    assert [r[0] for r in accuracy] == ["CapsNet", "CNN (baseline)"]
    assert len(table_rows(section(text, "Accuracy"), "class")) == 10
    equivariance = table_rows(section(text, "Pose equivariance"), "transform")
    assert len(equivariance) == 6 and "**Reading:**" in section(text, "Pose equivariance")
    assert {r[0] for r in equivariance} == {"shift", "rotation", "scale"}
    for row in equivariance:
        assert 0 <= float(row[2]) <= 1 and 0 < float(row[3]) < 1

    iterations = table_rows(section(text, "Routing"), "iterations")
    assert [r[0] for r in iterations] == ["1", "2", "3 (trained)", "4", "5"]
    assert all(float(r[2]) > 0 for r in iterations)
    assert "not the affine-test dataset" in section(text, "Affine robustness")
    assert "one object per image" in section(text, "Overlapping digits")


def test_cnn_checkpoint_skips_the_capsule_sections(tmp_path, checkpoints, tiny_shards):
    out, text = report(tmp_path, checkpoints["tiny-cnn"], tiny_shards)
    for title in ("Reconstructions", "Dimension perturbation", "Routing"):
        assert "*Skipped: the checkpoint is a CNN, which has no capsules.*" in section(text, title)
    assert not (out / "reconstructions.png").exists() and not (out / "couplings.png").exists()
    assert len(table_rows(section(text, "Pose equivariance"), "transform")) == 3
    assert_finite(out, text)


def test_multimnist_overlapping_section(tmp_path, checkpoints, multimnist_shards):
    out, text = report(
        tmp_path, checkpoints["multi"], multimnist_shards, "--sections", "accuracy,overlapping"
    )
    overlap = section(text, "Overlapping digits")
    [[model, both, error]] = table_rows(overlap, "model")
    assert model == "CapsNet" and abs(float(both) + float(error) - 1) < 1e-3
    # input, the two capsules' reconstructions, the two true parts; the 4 samples shown
    assert png_size(out / "overlapping.png") == figures.image_grid_size(5, 4)
    assert "need single-label data" in section(text, "Accuracy")
    assert "*Skipped: not requested (--sections accuracy,overlapping).*" in section(
        text, "Affine robustness"
    )
    assert "--sections accuracy,overlapping" in text.split("```")[1]
    assert_finite(out, text)


def test_affine_section_bins_the_stored_parameters(tmp_path, checkpoints, affine_shards):
    baseline = ["--baseline", str(checkpoints["affine-cnn"])]
    out, text = report(
        tmp_path, checkpoints["affine"], affine_shards, *baseline, "--sections", "affine"
    )
    affine = section(text, "Affine robustness")
    assert [r[0] for r in table_rows(affine, "model")] == ["CapsNet", "CNN (baseline)"]
    bins = table_rows(affine, "parameter")
    assert [r[0] for r in bins] == ["rotation_deg"] * 4 + ["shear"] * 4
    for parameter in ("rotation_deg", "shear"):  # every one of the 40 samples in one bin
        assert sum(int(r[2]) for r in bins if r[0] == parameter) == 40
    assert (out / "affine.png").exists()
    numbers = json.loads((out / "report.json").read_text())["affine"]
    assert numbers["samples"] == 40 and len(numbers["bins"]) == 8
    assert "not requested" in section(text, "Overlapping digits")
    assert_finite(out, text)


def test_affine_metadata_lines_up_with_the_loader(affine_shards):
    info = load_dataset_info(affine_shards)
    meta = S.sample_metadata(info, "test", 30)
    loader = open_loader(info, "test", batch_size=8, training=False)
    labels = torch.cat([b.labels for b in S.batches(loader, torch.device("cpu"), 30)])
    assert [m["cls"] for m in meta] == labels.tolist()
    assert all(abs(m["rotation_deg"]) <= 20 and abs(m["shear"]) <= 0.2 for m in meta)


def test_perturbation_at_offset_zero_is_the_reconstruction():
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig.tiny()).eval()
    images = torch.rand(3, 1, 12, 12)
    decoded, winners = S.perturb_dimensions(model, images)
    recon, predicted = S.reconstruct_predicted(model, images)
    assert decoded.shape == (3, 6, 11, 1, 12, 12) and torch.equal(winners, predicted)
    zero = S.PERTURBATION_OFFSETS.index(0.0)
    torch.testing.assert_close(decoded[:, :, zero], recon[:, None].expand_as(decoded[:, :, zero]))
    assert not torch.allclose(decoded[:, :, 0], decoded[:, :, -1])


def test_routing_sweep_restores_the_config_and_skips_routings_without_iterations(tiny_shards):
    model = CapsNet(CapsNetConfig.tiny()).eval()
    batch = S.take_samples(
        open_loader(tiny_shards, "test", batch_size=16, training=False), "cpu", 16
    )
    before = model.classes.routing.config
    rows = S.routing_sweep(model, [batch])
    assert [r.iterations for r in rows] == [1, 2, 3, 4, 5]
    assert model.classes.routing.config is before
    uniform = CapsNet(CapsNetConfig.tiny(routing={"name": "uniform"}))
    assert S.routing_iterations(uniform) is None and S.routing_iterations(model) == 3


def test_routing_sweep_asks_the_forward_pass_and_never_patches_the_config(tiny_shards):
    model = CapsNet(CapsNetConfig.tiny()).eval()
    batch = S.take_samples(open_loader(tiny_shards, "test", batch_size=8, training=False), "cpu", 8)
    routing = model.classes.routing

    class Frozen(type(routing)):  # the sweep's model is shared with the other sections
        def __setattr__(self, name, value):
            if name == "config":
                raise AssertionError("routing_sweep patched the routing config")
            super().__setattr__(name, value)

    routing.__class__ = Frozen
    asked, forward = [], model.forward

    def spy(images, **kw):
        asked.append(kw.get("routing_iterations"))
        return forward(images, **kw)

    model.forward = spy
    rows = S.routing_sweep(model, [batch], iterations=(1, 4))
    assert [r.iterations for r in rows] == [1, 4] and asked[-2:] == [1, 4]


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_routing_iterations_follow_the_registry(name):
    model = CapsNet(CapsNetConfig.tiny(routing={"name": name}))
    expected = model.config.routing.iterations if ROUTINGS[name].has_iterations else None
    assert S.routing_iterations(model) == expected


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_routing_section_sweeps_exactly_the_algorithms_with_iterations(tmp_path, tiny_shards, name):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_shards, f"model.routing.name={name}")
    out, text = report(tmp_path, ckpt, tiny_shards, "--sections", "routing")
    routing = section(text, "Routing")
    assert (out / "couplings.png").is_file()
    skipped = f"routing {name!r} has no iterations setting" in routing
    assert skipped != ROUTINGS[name].has_iterations
    assert ("| iterations |" in routing) == ROUTINGS[name].has_iterations


def test_help_lists_every_section(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for s in SECTIONS:
        assert f"  {s.name} " in text
    for option in ("--checkpoint", "--baseline", "--shards", "--out", "--samples", "--device"):
        assert option in text


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("capsnet baseline", "the baseline must be a CNN"),
        ("other image size", "expects 1x12x12 images"),
        ("bad samples", "--samples must be >= 1"),
        ("unknown section", "--sections: unknown ['routng']"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path, capsys, checkpoints, tiny_shards, multimnist_shards, problem, expected
):
    args = ["report", "--checkpoint", str(checkpoints["tiny"]), "--out", str(tmp_path)]
    args += {
        "capsnet baseline": ["--shards", str(tiny_shards), "--baseline", str(checkpoints["tiny"])],
        "other image size": ["--shards", str(multimnist_shards)],
        "bad samples": ["--shards", str(tiny_shards), "--samples", "0"],
        "unknown section": ["--shards", str(tiny_shards), "--sections", "accuracy,routng"],
    }[problem]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("option", ["--checkpoint", "--baseline"])
def test_empty_checkpoint_is_one_line_exit_2(tmp_path, capsys, checkpoints, tiny_shards, option):
    given = {"--checkpoint": str(checkpoints["tiny"]), "--baseline": None, option: ""}
    args = ["report", "--shards", str(tiny_shards), "--out", str(tmp_path / "r"), *SMALL]
    args += [word for opt, path in given.items() if path is not None for word in (opt, path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"capsnet report: error: {option}: empty; give a checkpoint.pt, its folder, or a run folder"
    )
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "r").exists()
