"""Fast tier: pipeline.submit (the logic behind `make train-cluster`) without a cluster."""

from __future__ import annotations

import http.server
import json
import shlex
import socket
import sys
import threading
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import apply_overrides
from pipeline.submit import UPLOAD_EXCLUDES, SubmitError, flatten, resolve_address


def main(argv):
    """`capsnet submit ARGV`."""
    return cli_main(["submit", *argv])


REPO = Path(__file__).resolve().parents[2]
SMOKE = "configs/cluster/smoke-2node.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
        ("127.0.0.1:8265/", "http://127.0.0.1:8265"),
        ("https://ray.example.org", "https://ray.example.org"),
    ],
)
def test_resolve_address(given, expected):
    assert resolve_address(given, {}) == expected


@pytest.mark.parametrize("bad", ["", "auto", "ray://head:10001", "10.0.0.1:6379"])
def test_resolve_address_rejects_non_jobs_addresses(bad):
    with pytest.raises(SubmitError):
        resolve_address(bad, {})


def test_env_address_is_used(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.1.2.3:8265")
    assert resolve_address(None, dict(__import__("os").environ)) == "http://10.1.2.3:8265"


def test_missing_address_says_how_to_start_a_cluster(capsys):
    assert main(["train", "--config", SMOKE]) == 2
    err = capsys.readouterr().err
    for hint in ("make cluster-up CLOUD=aws", "ray start --head", "RAY_AUTH_TOKEN"):
        assert hint in err


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_cluster_says_how_to_start_one(capsys):
    rc = main(
        [
            "train",
            "--config",
            SMOKE,
            "--address",
            f"http://127.0.0.1:{_closed_port()}",
            "--timeout",
            "2",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster" in err and "make cluster-up" in err


@pytest.fixture
def refusing_server():
    """A Jobs-API stand-in that answers 401 like a token-protected Ray dashboard."""
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen["authorization"] = self.headers.get("Authorization")
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_refused_token_is_explained(refusing_server, monkeypatch, capsys):
    address, seen = refusing_server
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    assert main(["train", "--config", SMOKE, "--address", address]) == 2
    assert "auth token" in capsys.readouterr().err
    assert seen["authorization"] == "Bearer tok-123"  # the probe sends the env's token


def _dry_run(capsys, *args: str) -> list[str]:
    assert main(["train", "--dry-run", "--address", "http://h:8265", *args]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def test_dry_run_submits_the_working_dir_without_bulk_or_secrets(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token")
    cmd = _dry_run(capsys, "--config", SMOKE, "--set", "train.epochs=1")
    assert cmd[cmd.index("--working-dir") + 1] == "."
    runtime_env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    for folder in (".venv", ".git", "runs", "shards", "data"):
        assert folder in runtime_env["excludes"]
    assert "s3cr3t-token" not in " ".join(cmd)
    entry = cmd[cmd.index("--") + 1 :]
    assert entry == [
        "python",
        "-m",
        "pipeline.cli",
        "train",
        "--config",
        SMOKE,
        "--set",
        "train.epochs=1",
    ]
    from pipeline.cli import build_parser

    assert build_parser().parse_args(entry[3:]).func  # capsnet's own CLI accepts it


def test_config_outside_the_working_dir_goes_inline(capsys, tmp_path):
    source = (REPO / SMOKE).read_text()
    outside = tmp_path / "c.yaml"
    outside.write_text(source)
    outside.write_text(source + "debug:\n")  # an empty section is the defaults
    cmd = _dry_run(capsys, "--config", str(outside))
    entry = cmd[cmd.index("--") + 1 :]
    assert "--config" not in entry
    overrides = entry[entry.index("train") + 1 :][1::2]
    import yaml

    assert apply_overrides({}, overrides) == yaml.safe_load(source)


def test_relative_paths_are_refused(capsys):
    assert main(["train", "--config", "configs/smoke.yaml", "--dry-run"]) == 2
    assert "relative path" in capsys.readouterr().err


def test_config_errors_fail_before_anything_is_sent(capsys):
    assert (
        main(
            ["train", "--config", SMOKE, "--set", "train.lrr=1", "--address", "http://127.0.0.1:1"]
        )
        == 2
    )
    assert "train.lrr" in capsys.readouterr().err


def test_flatten_round_trips():
    tree = {"a": {"b": 1, "c": [1, 2], "d": {"e": "x y", "f": None, "g": "1e-3", "h": {}}}}
    assert apply_overrides({}, flatten(tree)) == tree


def test_excludes_cover_what_must_not_be_uploaded():
    assert {".venv", ".git", "runs", "shards", "data"} <= set(UPLOAD_EXCLUDES)


@pytest.mark.slow  # a fresh interpreter
def test_help_runs():
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0 and "RAY_ADDRESS" in r.stdout


def test_pip_deps_ships_the_project_dependencies_but_not_ray(capsys):
    cmd = _dry_run(capsys, "--config", SMOKE, "--pip-deps")
    pip = json.loads(cmd[cmd.index("--runtime-env-json") + 1])["pip"]
    assert any(p.startswith("webdataset") for p in pip) and any(p.startswith("torch") for p in pip)
    assert not any(p.startswith("ray") for p in pip)


@pytest.mark.parametrize(
    "address, ok",
    [
        ("http://127.0.0.1:8265", True),
        ("http://localhost:8265", True),
        ("https://ray.example.org:8265", True),
        ("http://10.0.0.5:8265", False),
        ("http://ray.example.org:8265", False),
    ],
)
def test_token_never_goes_over_plain_http_to_another_host(address, ok):
    from pipeline.submit import check_token_transport

    env = {"RAY_AUTH_TOKEN": "s3cr3t", "HOME": "/nonexistent"}
    if ok:
        check_token_transport(address, env)
    else:
        with pytest.raises(SubmitError, match="tunnel"):
            check_token_transport(address, env)
        check_token_transport(address, env, allow=True)  # an explicit, trusted-network choice
    check_token_transport(address, {"HOME": "/nonexistent"})  # no token: nothing to leak


def test_errors_name_the_submit_command(capsys):
    """The job's own subcommand (train) used to overwrite the CLI's: `capsnet train: error:`."""
    assert main(["train", "--config", "configs/smoke.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capsnet submit: error:"), err


@pytest.mark.parametrize("where", ["cwd", "flag"])
def test_the_working_dir_must_be_the_project(capsys, monkeypatch, tmp_path, where):
    """Whatever folder submit ran from was packed and uploaded; now it must be this project."""
    (tmp_path / "notes.txt").write_text("not a project\n")
    args = ["train", "--config", str(REPO / SMOKE), "--dry-run"]
    if where == "cwd":
        monkeypatch.chdir(tmp_path)
    else:
        args += ["--working-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not the capsnet project" in err and str(tmp_path) in err
