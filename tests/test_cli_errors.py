"""Errors a person can read: one `error:` line and exit status 2, never a raw traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04" + b"\x00" * 40])
def test_corrupt_checkpoint(tmp_path, capsys, content):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(content)
    code, err = run(capsys, "eval", "--checkpoint", str(ckpt), "--shards", str(tmp_path))
    assert code == 2 and "not a readable checkpoint" in err and str(ckpt) in err
    assert "Traceback" not in err


def test_shards_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, err = run(
        capsys, "shards", "--dataset", "synthetic", "--out", str(target), "--no-progress"
    )
    assert code == 2 and "is a file" in err


def test_absurd_image_size_is_refused_before_allocating(tmp_path, capsys):
    code, err = run(
        capsys,
        "shards",
        "--dataset",
        "synthetic",
        "--out",
        str(tmp_path / "s"),
        "--image-size",
        "100000",
        "--no-progress",
    )
    assert code == 2 and "--image-size must be <= 1024" in err


def test_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1e-3\n")
    code, err = run(capsys, "train", "--config", str(bad))
    assert code == 2 and "bad.yaml" in err and "line" in err and "<unicode string>" not in err


def test_run_name_cannot_leave_storage(capsys):
    code, err = run(capsys, "train", "--set", "run.name=..", "--dry-run")
    assert code == 2 and "run.name" in err


def test_report_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, err = run(capsys, "report", "--checkpoint", str(missing), "--shards", str(tmp_path))
    assert code == 2 and "no checkpoint at" in err and str(missing) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # error + debug hint


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError reading a checkpoint (permissions, EIO) is not corruption (issue 19 item 5)
    but still one line naming the file, not a traceback."""
    import pipeline.train.checkpoint as checkpoint

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.torch, "load", denied)
    code, err = run(capsys, "eval", "--checkpoint", str(ckpt), "--shards", str(tmp_path))
    assert code == 2 and "Permission denied" in err and str(ckpt) in err, err
    assert "Traceback" not in err
