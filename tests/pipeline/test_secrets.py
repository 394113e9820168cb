"""Issue 19 item 12: credentials in URIs (user:password@, s3://KEY:SECRET@, presigned query
strings) never reach what a run writes or shows: config.yaml, checkpoints, tracker configs,
log lines, error messages, or curl's command line (visible in `ps`)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pipeline.redact import redact, redact_tree
from pipeline.train.loop import run_dir_for
from pipeline.train.trainer import train

SECRET = "PASSWORD-7c1e"

CASES = [
    (f"http://user:{SECRET}@127.0.0.1:8000/shards", "http://***@127.0.0.1:8000/shards"),
    (f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs", "s3://***@bucket/runs"),
    (
        f"https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature={SECRET}"
        "&X-Amz-Expires=60",
        "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=***&X-Amz-Signature=***"
        "&X-Amz-Expires=60",
    ),
    (f"see http://u:{SECRET}@h/x and gs://b/p", "see http://***@h/x and gs://b/p"),
    ("https://example.org/shards/train-{000000..000009}.tar", None),  # unchanged
    ("s3://bucket/runs", None),
    ("plain text with an @ sign: a@b", None),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_redact(text, expected):
    assert redact(text) == (text if expected is None else expected)
    assert redact(redact(text)) == redact(text)  # idempotent


def test_redact_tree_reaches_nested_values():
    tree = {"data": {"shards": CASES[0][0]}, "run": {"report_to": [CASES[1][0]]}, "n": 3}
    out = redact_tree(tree)
    assert SECRET not in repr(out) and out["n"] == 3 and tree["data"]["shards"] == CASES[0][0]


def test_a_run_over_a_url_with_a_password_writes_it_nowhere(
    tiny_shards, tiny_config, tmp_path, monkeypatch, capsys, serve_http
):
    argv: list[list[str]] = []
    real = subprocess.Popen

    def recording(args, *a, **kw):
        argv.append([str(x) for x in args])
        return real(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", recording)
    with serve_http(tiny_shards, userinfo=f"user:{SECRET}@") as url:
        cfg = tiny_config(url, tmp_path, "train.epochs=1", "train.max_steps_per_epoch=2")
        train(cfg, local=True)
    out = capsys.readouterr()
    assert any("curl" in a[0] for a in argv), "the shards were not read through curl"
    assert not any(SECRET in " ".join(a) for a in argv), "the password is on curl's command line"
    run_dir = run_dir_for(cfg)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    ckpt = torch.load(next(run_dir.glob("checkpoint_*/checkpoint.pt")), weights_only=False)
    assert "***@127.0.0.1" in ckpt["run_config"]["data"]["shards"]
    assert SECRET not in out.out + out.err
