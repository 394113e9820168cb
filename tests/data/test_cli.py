"""`capsnet shards` from the command line."""

from __future__ import annotations

import pytest

from pipeline import cli
from pipeline.commands import shards as shards_command
from pipeline.data import load_dataset_info


def test_shards_writes_a_synthetic_dataset(tmp_path, capsys):
    out = tmp_path / "s"
    argv = [
        "shards",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--train-samples",
        "64",
        "--test-samples",
        "16",
        "--image-size",
        "8",
        "--num-classes",
        "4",
        "--shard-size",
        "32",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    info = load_dataset_info(out)
    assert info.num_classes == 4 and [len(s.shards) for s in info.splits.values()] == [2, 1]
    assert "wrote synthetic" in capsys.readouterr().out
    assert cli.main(argv) == 2  # refuses to clobber without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0


def test_missing_torchvision_files_are_explained(tmp_path, capsys):
    code = cli.main(
        ["shards", "--dataset", "kmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "KMNIST/raw/train-images-idx3-ubyte" in err
        and "--download" in err
        and "--dataset idx" in err
    )
    assert "Traceback" not in err


def test_help_lists_datasets(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["shards", "--help"])
    assert exit_.value.code == 0
    assert "multimnist" in capsys.readouterr().out


def test_parser_is_extensible():
    parser = cli.build_parser()
    args = parser.parse_args(["shards", "--dataset", "synthetic", "--out", "x"])
    assert args.func is shards_command.run and args.shard_size == 10_000
