"""capsnet eval: outputs named after the checkpoint's folder, and a clear error for a device
this machine does not have (fast tier: an untrained tiny checkpoint, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from capscore import build_model
from pipeline.cli import main
from pipeline.commands import eval as eval_command
from pipeline.config import load_config
from pipeline.data import load_dataset_info
from pipeline.train.checkpoint import TrainState


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """runs/tiny/checkpoints/{best,last}/checkpoint.pt of an untrained tiny CapsNet."""
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(None, ["model.preset=tiny", f"data.shards={tiny_shards}"])
    info = load_dataset_info(tiny_shards)
    model = build_model(cfg.build_model_config(info.image_shape, info.num_classes))
    state = TrainState.create(model, cfg.train, torch.device("cpu"))
    run = root / "tiny"
    for name in ("best", "last"):
        state.save(run / "checkpoints" / name, run_config=cfg.to_dict(), metrics={})
    return run


def eval_args(checkpoint, shards, *extra):
    return [
        *("eval", "--checkpoint", str(checkpoint), "--shards", str(shards)),
        *("--loader-workers", "0", "--batch-size", "32", *extra),
    ]


@pytest.mark.parametrize("name, given", [("best", "folder"), ("last", "checkpoint.pt")])
def test_outputs_beside_the_checkpoint(run_dir, tiny_shards, capsys, name, given):
    folder = run_dir / "checkpoints" / name
    checkpoint = folder if given == "folder" else folder / "checkpoint.pt"
    assert main(eval_args(checkpoint, tiny_shards)) == 0
    out = capsys.readouterr().out
    json_path, png = folder / f"eval-{name}-test.json", folder / f"confusion-{name}-test.png"
    assert f"metrics: {json_path}" in out and f"confusion matrix: {png}" in out
    report = json.loads(json_path.read_text())
    assert report["checkpoint"] == str((folder / "checkpoint.pt").resolve())
    assert report["shards"] == str(tiny_shards.resolve())
    assert (report["split"], report["samples"]) == ("test", 80)
    assert report["accuracy"] + report["error"] == pytest.approx(1.0)
    assert len(report["per_class_accuracy"]) == len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == 80
    assert {"margin", "reconstruction"} <= set(report["losses"])
    assert png.stat().st_size > 1000
    # best/ and last/ no longer share (and overwrite) one PNG in checkpoints/
    assert not list((run_dir / "checkpoints").glob("*.png"))


def test_out_folder(run_dir, tiny_shards, tmp_path):
    best = run_dir / "checkpoints" / "best"
    assert main(eval_args(best, tiny_shards, "--out", str(tmp_path / "o"), "--split", "train")) == 0
    assert (tmp_path / "o" / "eval-best-train.json").is_file()
    assert (tmp_path / "o" / "confusion-best-train.png").is_file()


@pytest.mark.parametrize(
    "device, gpus",
    [("cuda", 0), ("cuda:5", 2), ("gpu0", 0), ("cuda:x", 2)],
)
def test_unavailable_device_is_one_line_exit_2(
    run_dir, tiny_shards, monkeypatch, capsys, device, gpus
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert main(eval_args(run_dir / "checkpoints" / "best", tiny_shards, "--device", device)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"capsnet eval: error: --device {device}: not available here; available: auto, cpu"
        + "".join(f", {d}" for d in (["cuda", "cuda:0", "cuda:1"] if gpus else []))
    )
    assert "Traceback" not in err


def test_available_devices_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert eval_command.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert eval_command.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_command.resolve_device("auto") == torch.device("cpu")
    assert eval_command.resolve_device("cpu") == torch.device("cpu")
