"""`capsnet submit` (`make train-cluster` / `make tune-cluster`): `capsnet train|tune` as a Ray Job.

    capsnet submit train --config configs/cluster/mnist-16gpu.yaml [--address URL]

What it does, in order:
1. validates the run config here (a typo fails in a second, not after an upload);
2. resolves the cluster's Jobs API address (--address, else $RAY_ADDRESS) and checks that it
   answers; if not, says how to start or reach a cluster;
3. runs `ray job submit --address … --working-dir . --runtime-env-json … -- python -m
   pipeline.cli train --config …`, which uploads this checkout (without .venv, .git, runs,
   shards, data), follows the job's logs and exits non-zero if the job fails.

The Ray auth token is never read from, written to or uploaded with the repository: `ray job
submit` takes it from the environment ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), and the job's processes get it from the cluster's own nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence  # noqa: F401
from pathlib import Path
from typing import Any

import yaml

#: Never uploaded with the working dir (gitignore syntax, relative to the working dir).
UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "shards",
    "data",
    "out",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.tar",
    "*.pt",
    ".ray",
]

HOW_TO_START = """\
How to get a cluster and its address:
  * cloud VMs:  make cluster-up CLOUD=aws   (or CLOUD=gcp), then in another terminal
                ray dashboard cluster/aws.yaml      # tunnels the Jobs API to 127.0.0.1:8265
  * Kubernetes: kubectl apply -f cluster/kuberay/raycluster.yaml, then
                kubectl port-forward svc/capsnet-head-svc 8265:8265
  * SLURM:      sbatch cluster/slurm/capsnet.sbatch (starts Ray and trains in one job)
  * this machine, for a try-out:
                ray start --head --dashboard-host 127.0.0.1 --dashboard-port 8265
and then:  make train-cluster RAY_ADDRESS=http://127.0.0.1:8265 CONFIG=...
Token: Ray clusters require their auth token. Give it to this command from outside the repo:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/capsnet-token   (or RAY_AUTH_TOKEN=...)
  (on the head node `ray get-auth-token` prints it; see docs/cluster.md "Credentials")."""


class SubmitError(RuntimeError):
    """Something to fix before a job can be submitted; the message says what."""


# --- address and token ----------------------------------------------------------------------


def resolve_address(cli_value: str | None, env: dict[str, str]) -> str:
    """The Jobs API URL from --address or $RAY_ADDRESS, normalised to http(s)://host:port."""
    address = (cli_value or env.get("RAY_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise SubmitError(
            "no cluster address: pass --address URL or set RAY_ADDRESS "
            "(e.g. RAY_ADDRESS=http://127.0.0.1:8265).\n\n" + HOW_TO_START
        )
    if address == "auto" or address.startswith("ray://"):
        raise SubmitError(
            f"RAY_ADDRESS={address!r} is not a Jobs API address; jobs are "
            "submitted to the dashboard, e.g. http://127.0.0.1:8265.\n\n" + HOW_TO_START
        )
    if "://" not in address:
        address = "http://" + address
    if address.rsplit(":", 1)[-1] in ("6379", "10001"):
        raise SubmitError(
            f"{address} looks like the GCS/client port, not the dashboard; use the "
            "dashboard port (default 8265), e.g. http://127.0.0.1:8265"
        )
    return address


def check_token_transport(address: str, env: dict[str, str], *, allow: bool = False) -> None:
    """The Ray token travels in a header of every Jobs API request: refuse plain http to a
    host that is not this machine (anyone on the path could read it), unless allowed."""
    import ipaddress
    import urllib.parse

    token = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or _default_token(env)
    url = urllib.parse.urlsplit(address)
    host = url.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not token or url.scheme == "https" or loopback or allow:
        return
    raise SubmitError(
        f"{address} is plain http to another host: the Ray auth token would cross the network "
        "unencrypted. Reach the Jobs API through a tunnel (e.g. `ray dashboard cluster/aws.yaml`"
        ", or `kubectl port-forward`, then --address http://127.0.0.1:8265), use https, or pass "
        "--allow-plain-http if this network is trusted"
    )


def _default_token(env: dict[str, str]) -> str | None:
    path = Path(env.get("HOME", "~")).expanduser() / ".ray" / "auth_token"
    return str(path) if path.is_file() else None


def auth_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for `ray job submit`: token auth switched on when a token is given.

    A token given as $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH means the user wants token auth,
    so RAY_AUTH_MODE=token is set for the child if unset. Nothing is read from the repo.
    """
    out = dict(env)
    if (out.get("RAY_AUTH_TOKEN") or out.get("RAY_AUTH_TOKEN_PATH")) and not out.get(
        "RAY_AUTH_MODE"
    ):
        out["RAY_AUTH_MODE"] = "token"
    path = out.get("RAY_AUTH_TOKEN_PATH")
    if path and not Path(path).expanduser().is_file():
        raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
    return out


def _token_for_probe(env: dict[str, str]) -> str | None:
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


def check_reachable(address: str, env: dict[str, str], timeout: float) -> None:
    """Ask the Jobs API for its version; fail with how-to-fix when it does not answer."""
    request = urllib.request.Request(f"{address}/api/version")
    token = _token_for_probe(env)
    if token and env.get("RAY_AUTH_MODE", "token") != "disabled":
        # unredirected: urllib copies add_header headers onto redirects, also to other hosts
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            version = json.loads(response.read() or b"{}").get("ray_version", "?")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise SubmitError(
                f"the cluster at {address} refused the request (HTTP {e.code}): it needs its "
                "auth token. Set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the token the cluster "
                "was started with (`ray get-auth-token` on the head node), and RAY_AUTH_MODE=token."
            ) from None
        raise SubmitError(
            f"the cluster at {address} answered HTTP {e.code} on /api/version; "
            "is this the Ray dashboard address?"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(
            f"cannot reach a Ray cluster at {address} ({reason}).\n\n" + HOW_TO_START
        ) from None
    print(f"[submit] cluster at {address} answers (Ray {version})", flush=True)


# --- the job --------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested config -> `a.b=value` overrides that `apply_overrides` turns back into it."""
    out: list[str] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flatten(value, path + ".")
        else:
            out.append(f"{path}={_scalar(value)}")
    return out


def _scalar(value: Any) -> str:
    """A value as `--set` parses it back (YAML); plain strings stay unquoted when unambiguous."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def config_args(config: Path, working_dir: Path) -> tuple[list[str], str]:
    """`--config REL` when the file is uploaded with the working dir, else inline overrides.

    A config outside the working dir (say a generated one in /tmp) would not reach the cluster,
    so its values are passed as `--set` overrides instead, checked to round-trip exactly.
    """
    from pipeline.config import apply_overrides

    resolved, root = config.resolve(), working_dir.resolve()
    if resolved.is_relative_to(root):
        return ["--config", resolved.relative_to(root).as_posix()], "uploaded with the working dir"
    raw = yaml.safe_load(resolved.read_text()) or {}
    # An empty section (`debug:` or `debug: {}`) means the defaults: nothing to pass.
    raw = {k: v for k, v in raw.items() if v not in (None, {})} if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise SubmitError(f"{config}: a config is a mapping of sections")
    flat = flatten(raw)
    if apply_overrides({}, flat) != raw:
        raise SubmitError(
            f"{config} is outside the working dir and cannot be passed inline; "
            "move it under the working dir (e.g. configs/cluster/)"
        )
    return [a for item in flat for a in ("--set", item)], "outside the working dir: passed inline"


def validate_locally(command: str, config: Path, overrides: Sequence[str]) -> str:
    """Fail here, before any upload, on config errors; returns the run name."""
    if not config.is_file():
        raise SubmitError(f"config file not found: {config}")
    if command != "train":
        return config.stem
    from pipeline.config import load_config

    cfg = load_config(config, list(overrides))
    for key, value in (
        ("data.shards", cfg.data.shards),
        ("run.storage_path", cfg.run.storage_path),
    ):
        if "://" not in value and not Path(value).expanduser().is_absolute():
            raise SubmitError(
                f"{key}={value!r} is a relative path: on the cluster it would point inside the "
                "job's temporary copy of the repo (shards are not uploaded; outputs would be "
                f"lost). Use object storage or a shared absolute path, e.g. --set {key}="
                f"s3://YOUR-BUCKET/capsnet/{'shards/mnist' if key == 'data.shards' else 'runs'}"
                " (configs/cluster/ holds configs written for a cluster)"
            )
    return cfg.run.name


def project_dependencies(working_dir: Path) -> list[str]:
    """[project].dependencies of pyproject.toml, without Ray (the cluster's own must be used)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise SubmitError("--pip-deps needs Python >= 3.11 (tomllib)") from None
    deps = tomllib.loads((working_dir / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.replace("_", "-").lower().startswith("ray")]


def runtime_env(pip: list[str] | None = None) -> dict[str, Any]:
    # The token is deliberately absent: job runtime envs are visible in the dashboard and job
    # info; every node already has the token from how the cluster was started.
    env: dict[str, Any] = {"excludes": UPLOAD_EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if pip:
        env["pip"] = pip
    return env


def submit_command(args: argparse.Namespace, address: str, run_name: str) -> list[str]:
    working_dir = Path(args.working_dir)
    cfg_args, _ = config_args(Path(args.config), working_dir)
    submission_id = args.submission_id or (
        f"capsnet-{args.command}-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env(project_dependencies(working_dir) if args.pip_deps else None)),
        "--submission-id",
        submission_id,
        "--log-style",
        "record",
    ]
    if args.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if args.no_wait:
        cmd.append("--no-wait")
    entrypoint = ["python", "-m", "pipeline.cli", args.command, *cfg_args]
    for item in args.overrides:
        entrypoint += ["--set", item]
    # `ray job submit` shell-quotes each entrypoint argument itself (shlex.join).
    return [*cmd, "--", *entrypoint]


def check_project(working_dir: Path) -> None:
    """The folder uploaded as the job's working dir is this project (its pyproject.toml names
    it): the job runs `python -m pipeline.cli` from it, and anything else would be packed
    and uploaded for nothing, or fail on the cluster."""
    try:
        import tomllib

        name = tomllib.loads((working_dir / "pyproject.toml").read_text())["project"]["name"]
    except (OSError, KeyError, ValueError, ModuleNotFoundError):
        name = None
    if name != PROJECT or not (working_dir / "pipeline" / "cli.py").is_file():
        raise SubmitError(
            f"{working_dir.resolve()} is not the capsnet project (no pyproject.toml naming "
            f"{PROJECT} beside pipeline/): run from the repository root, or give it with "
            "--working-dir"
        )


PROJECT = "capsnet-cluster"


def submit(args: argparse.Namespace) -> int:
    """`capsnet submit`: validate, reach the cluster, run `ray job submit` and follow it."""
    check_project(Path(args.working_dir))
    run_name = validate_locally(args.command, Path(args.config), args.overrides)
    env = auth_env(dict(os.environ))
    if args.dry_run:
        address = (args.address or env.get("RAY_ADDRESS") or "http://HEAD:8265").rstrip("/")
        print(shlex.join(submit_command(args, address, run_name)))
        return 0
    address = resolve_address(args.address, env)
    check_token_transport(address, env, allow=args.allow_plain_http)
    check_reachable(address, env, args.timeout)
    cmd = submit_command(args, address, run_name)
    env.pop("RAY_ADDRESS", None)  # --address is explicit; a stale ray:// value would confuse ray
    print(f"[submit] {shlex.join(cmd[cmd.index('job') :])}", flush=True)
    returncode = run_submit(cmd, env, args.working_dir)
    if returncode != 0:
        print(
            f"capsnet submit: the job failed or could not be followed (exit {returncode}); "
            f"`ray job logs --address {address} <id>` shows its logs",
            file=sys.stderr,
        )
    return returncode


#: What the Jobs API answers while the head's job agent is still starting (a fresh cluster).
_AGENT_NOT_READY = "No available agent to submit job"


def run_submit(cmd: list[str], env: dict[str, str], cwd: str, tries: int = 6) -> int:
    """Run `ray job submit`, streaming its output; retry while a fresh head is still starting."""
    for attempt in range(1, tries + 1):
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        not_ready = submitted = False
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            not_ready |= _AGENT_NOT_READY in line
            submitted |= "submitted successfully" in line
        returncode = proc.wait()
        if returncode == 0 or submitted or not not_ready or attempt == tries:
            return returncode
        print(
            f"[submit] the cluster's job agent is not up yet; retrying in 5 s "
            f"({attempt}/{tries - 1})",
            flush=True,
        )
        time.sleep(5)
    return returncode
