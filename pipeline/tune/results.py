"""What a search leaves behind: one row per trial, the per-routing summary, the report files.

`report` writes results.csv, routing-summary.csv (a search over `model.routing.name`),
best-config.yaml and search.png into the experiment folder and prints the tables. It reads
Ray's results through a few attributes only (config, metrics, path, error,
metrics_dataframe), so tests hand it stand-ins.
"""

from __future__ import annotations

import csv
import math
import numbers
import statistics
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import RunConfig, absolute_path
from pipeline.data import DataError, load_dataset_info
from pipeline.figures import save_search_plot
from pipeline.train.context import FATAL_KEY
from pipeline.tune.space import TuneConfig, not_applicable, trial_config

NOT_APPLICABLE = "n/a"
"""Results-table value of a sampled key that the trial's registry entry does not have."""

ROUTING_KEY = "model.routing.name"


def _history(result, trial: str, trial_storage: str) -> list[dict[str, Any]]:
    """Every epoch the trial's run reported: its metrics.jsonl when storage is local (complete
    even across restores), else what Tune recorded."""
    from pipeline.train.outputs import read_metrics

    if trial_storage and "://" not in trial_storage:
        rows = read_metrics(Path(trial_storage) / trial)
        if rows:
            return rows
    df = result.metrics_dataframe
    return df.to_dict("records") if df is not None else []


def _trial_error(result) -> str:
    """Why a trial failed: Tune's error (its type: Ray's messages run to pages of tracebacks),
    or the deterministic failure its run reported, in full ("NonFiniteLossError: ... at global
    step 1 ...")."""
    if result.error is not None:
        return type(result.error).__name__
    return str((result.metrics or {}).get(FATAL_KEY) or "")


def result_rows(results, tc: TuneConfig) -> list[dict[str, Any]]:
    """One row per trial: its parameters, best metric, epochs run, early stop, device time."""
    search = tc.search
    parameters = _ParameterCounts()
    rows = [_row(result, tc, parameters) for result in results]
    key = f"best_{search.metric}"
    rows.sort(key=lambda r: (math.isnan(r[key]), -r[key] if search.mode == "max" else r[key]))
    return rows


def _row(result, tc: TuneConfig, parameters: _ParameterCounts) -> dict[str, Any]:
    from pipeline.train.trainer import resolve_use_gpu

    search = tc.search
    params = result.config.get("params", {})
    trial = (result.metrics or {}).get("trial_id") or str(result.path).rsplit("/", 1)[-1]
    history = _history(result, trial, result.config.get("trial_storage", ""))
    # NaN epochs (diverged, or nothing evaluated yet) must not win max/min or hide the rest
    values = [v for h in history if _finite(v := h.get(search.metric))]
    best = (max(values) if search.mode == "max" else min(values)) if values else math.nan
    cfg = trial_config(tc.base, params)
    skipped = not_applicable(tc.base, params)
    # Tune's history of a run that failed after some epochs has a last row without them (NaN)
    epochs = max((int(e) for h in history if _finite(e := h.get("epoch"))), default=0)
    error = _trial_error(result)
    seconds = sum(t for h in history if _finite(t := h.get("epoch_time_s")))
    return {
        "trial": trial,
        **{k: NOT_APPLICABLE if k in skipped else params.get(k) for k in search.space},
        f"best_{search.metric}": best,
        "epochs_run": epochs,
        "stopped_early": not error and epochs < cfg.train.epochs,
        "error": error,
        "step_time_ms": _step_time_ms(history),
        "parameters": parameters.get(cfg),
        "device_hours": cfg.run.num_workers * seconds / 3600.0,
        "device": "GPU" if resolve_use_gpu(cfg.run.use_gpu) else "CPU",
    }


def _step_time_ms(history: list[dict[str, Any]]) -> float:
    """Median over epochs of the wall time per training step (loading included), in ms; the
    median, so a first epoch's start-up or a slow eval-heavy epoch does not dominate."""
    per_step = [
        1000.0 * float(h["epoch_time_s"]) / int(h["steps"])
        for h in history
        if h.get("steps") and _finite(h.get("epoch_time_s"))
    ]
    return statistics.median(per_step) if per_step else math.nan


class _ParameterCounts:
    """Parameters of each trial's model, built once per distinct model config on the driver
    (the model's shape needs the dataset's image shape and classes)."""

    def __init__(self) -> None:
        self._cache: dict[str, int | None] = {}
        self._infos: dict[str, Any] = {}

    def get(self, cfg: RunConfig) -> int | None:
        key = repr(cfg.to_dict()["model"]) + cfg.data.shards
        if key not in self._cache:
            self._cache[key] = self._count(cfg)
        return self._cache[key]

    def _count(self, cfg: RunConfig) -> int | None:
        from capscore import build_model

        try:
            if cfg.data.shards not in self._infos:
                self._infos[cfg.data.shards] = load_dataset_info(absolute_path(cfg.data.shards))
            info = self._infos[cfg.data.shards]
        except DataError:
            return None  # the table says "None": the shards are gone since the search ran
        model = build_model(cfg.build_model_config(info.image_shape, info.num_classes))
        return sum(p.numel() for p in model.parameters())


def routing_summary(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per routing algorithm of a search over `model.routing.name`: trials, the best and the
    mean ± sample standard deviation of each trial's best metric (e.g. over seeds), median
    time per training step and parameters, in the rows' order of first appearance."""
    key = f"best_{metric}"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[ROUTING_KEY]), []).append(row)
    out = []
    for name, group in groups.items():
        values = [r[key] for r in group if _finite(r[key])]
        times = [r["step_time_ms"] for r in group if _finite(r["step_time_ms"])]
        out.append(
            {
                "routing": name,
                "trials": len(group),
                f"best_{metric}": max(values) if values else math.nan,
                f"mean_{metric}": statistics.fmean(values) if values else math.nan,
                f"std_{metric}": statistics.stdev(values) if len(values) > 1 else math.nan,
                "step_time_ms": statistics.median(times) if times else math.nan,
                "parameters": group[0]["parameters"],
            }
        )
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)  # numpy floats too


def report(results, tc: TuneConfig, out_dir: Path) -> list[dict[str, Any]]:
    """results.csv, the table printed, best-config.yaml and search.png in the experiment folder;
    no best-config.yaml (and no plot) when no trial reported a finite metric."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results, tc)
    if not rows:
        raise RuntimeError("the search produced no trials")
    _write_csv(out_dir / "results.csv", rows)
    print(format_table([{**r, "error": r["error"].split(":", 1)[0]} for r in rows]))
    for row in rows:  # the table names the error; its reason on a line of its own
        if row["error"]:
            print(f"[capsnet] trial {row['trial']} failed: {row['error']}")
    if ROUTING_KEY in tc.search.space:
        summary = routing_summary(rows, tc.search.metric)
        _write_csv(out_dir / "routing-summary.csv", summary)
        print("\nper routing algorithm:\n" + format_table(summary))
    if not _finite(rows[0][f"best_{tc.search.metric}"]):  # sorted: finite values first
        print(
            f"[capsnet] results: {out_dir / 'results.csv'}; no trial reported a finite "
            f"{tc.search.metric}, so no best config was written"
        )
        return rows
    write_best_config(rows[0], tc, out_dir / "best-config.yaml")
    plot_search(rows, tc, out_dir / "search.png")
    print(
        f"[capsnet] results: {out_dir / 'results.csv'}; best config: "
        f"{out_dir / 'best-config.yaml'}; plot: {out_dir / 'search.png'}"
    )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_best_config(best: dict[str, Any], tc: TuneConfig, path: Path) -> None:
    """The best trial's run config, a `capsnet train --config` file with its command."""
    params = {k: best[k] for k in tc.search.space if best[k] != NOT_APPLICABLE}
    cfg = trial_config(tc.base, params)
    raw = cfg.to_dict()  # the form configs are written in
    raw["run"]["name"] = f"{tc.search.name}-best"
    header = (
        f"# Best trial of search '{tc.search.name}' ({tc.search.metric} "
        f"{best[f'best_{tc.search.metric}']:.4f}): {params}\n"
        f"# Command: capsnet train --config {path}\n"
        f"# Expected runtime: like one trial of the search, for all {cfg.train.epochs} epochs.\n"
    )
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plot_search(rows: list[dict[str, Any]], tc: TuneConfig, path: Path) -> None:
    """Best metric against routing iterations and lr (or the first two keys of the space)."""
    preferred = ("model.routing.iterations", "train.lr")
    axes_keys = [k for k in preferred if k in tc.search.space]
    axes_keys += [k for k in tc.search.space if k not in axes_keys][: max(0, 2 - len(axes_keys))]
    save_search_plot(rows, f"best_{tc.search.metric}", axes_keys or ["trial"], path)
