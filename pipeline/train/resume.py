"""Whether a rerun resumes, starts fresh, or refuses: decided on the driver, before Ray starts.

A rerun of the same command resumes only if its effective config equals the one the run's
checkpoints were trained with, except for keys that are safe to change (the fields marked
RESUME_SAFE: `pipeline.config.resume_safe_keys()`). The saved config is read with today's
defaults for keys it lacks (a run made before a setting existed resumes; the rerun says which
keys were filled). Anything else is refused with the diff and the ways out: `--new-run` (a new
run name), a new `run.name`, or `--allow-config-change`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, RunConfig, parse_run_config, resume_safe_keys
from pipeline.redact import redact_tree
from pipeline.schema import flatten
from pipeline.train.checkpoint import CheckpointIndex

CONFIG_FILE = "config.yaml"


@dataclass
class ResumePlan:
    state: Literal["fresh", "resume", "finished"]
    epochs_done: int = 0
    run_config: dict[str, Any] = field(default_factory=dict)
    """The config the run's checkpoints were trained with, as saved (empty for a fresh run)."""
    diff: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(key, checkpoint's value, this command's value) for every key that may not change."""
    filled: list[str] = field(default_factory=list)
    """Keys the saved config lacks (it predates them), read as today's defaults."""


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two run configs (as to_dict()), safe keys left out."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    missing = "(unset)"
    safe = resume_safe_keys()
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in keys
        if a.get(k, missing) != b.get(k, missing)
        and not any(fnmatch.fnmatchcase(k, pattern) for pattern in safe)
    ]


def _saved_config(raw: dict[str, Any], cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The saved config, defaults filled, for the same data as `cfg` (already filled)."""
    try:
        saved = parse_run_config(raw, str(run_dir / CONFIG_FILE))
    except ConfigError as err:
        raise ConfigError(
            f"{err}\nThis version cannot read the run's saved config; start a new run "
            f"(--new-run), or resume with this command's config: --allow-config-change"
        ) from None
    model = cfg.model
    return saved.for_data((model.in_channels, model.image_size), model.num_classes)


def plan_resume(cfg: RunConfig, run_dir: Path) -> ResumePlan:
    """What rerunning `cfg` (filled for its data) in `run_dir` would do (reads config.yaml and
    checkpoints.json)."""
    index = CheckpointIndex.load(run_dir)
    if not index.entries:
        return ResumePlan("fresh")
    done = max(int(e["epoch"]) for e in index.entries.values())
    config_path = run_dir / CONFIG_FILE
    raw = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    state = "finished" if done >= cfg.train.epochs else "resume"
    if not raw:
        return ResumePlan(state, epochs_done=done)
    saved = _saved_config(raw, cfg, run_dir).to_dict()
    given = flatten(raw)
    # Model fields absent from an old config come from its preset, as they did then.
    filled = [k for k in flatten(saved) if k not in given and not k.startswith("model.")]
    diff = config_diff(redact_tree(saved), cfg.to_record())  # config.yaml holds no secrets
    return ResumePlan(state, epochs_done=done, run_config=raw, diff=diff, filled=filled)


def check_resume(plan: ResumePlan, cfg: RunConfig, *, allow_config_change: bool) -> None:
    """Refuse what would silently mix two configs in one run (ConfigError, exit status 2)."""
    name = cfg.run.name
    if plan.state != "fresh" and cfg.run.resume_from:
        raise ConfigError(
            f"run {name!r} already has checkpoints ({plan.epochs_done} epochs done), so "
            f"--resume-from {cfg.run.resume_from} would be ignored: rerun without it to resume "
            f"the run, or start a new run from that checkpoint with --new-run (or a new run.name)"
        )
    if plan.state == "fresh" or not plan.diff or allow_config_change:
        return
    lines = [f"  {k}: {old!r} -> {new!r}" for k, old, new in plan.diff]
    raise ConfigError(
        f"run {name!r} has checkpoints trained with another config ({plan.epochs_done} epochs "
        f"done); resuming would mix them:\n" + "\n".join(lines) + "\n"
        "Either start a new run: --new-run (a timestamped run name) or --set run.name=NEW, "
        "or resume with the new values anyway: --allow-config-change.\n"
        f"Safe to change when resuming: {', '.join(resume_safe_keys())}"
    )


def write_config(cfg: RunConfig, run_dir: Path) -> Path:
    """`config.yaml`: the run's effective config, which a rerun is compared with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    header = f"# Effective config of run {cfg.run.name!r}; rerun: capsnet train --config {path}\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(cfg.to_record(), sort_keys=False))
    tmp.replace(path)
    return path
