"""`report.md` (+ `report.json` and the PNGs): every section of `capsnet report` in order.

Each section either writes its tables and figures or says why it does not apply to this
checkpoint and these shards. The numbers all come from one invocation, whose command line
heads the report; `report.json` holds the same numbers for scripts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capscore import CapsNet
from pipeline import figures
from pipeline.data import Batch, DatasetInfo, open_loader
from pipeline.evaluate import EvalResult, evaluate
from pipeline.report import sections as S
from pipeline.report.measures import FeaturesFn, capsnet_features, cnn_features


@dataclass(kw_only=True)
class ReportSettings:
    """How much data each part of the report uses."""

    samples: int = 16
    """Test images for the measures (equivariance) and the pictures (the first few)."""
    eval_samples: int = 2000
    """Test samples for the routing sweep and the affine bins (0: the whole split). Accuracy,
    per-class accuracy and the confusion matrix always use the whole split."""
    batch_size: int = 100
    """Images per forward pass."""
    split: str = "test"
    """The split every section reads."""
    sections: tuple[str, ...] = ()
    """The sections to write, by SECTIONS name (empty: all of them)."""

    def __post_init__(self) -> None:
        known = [s.name for s in SECTIONS]
        unknown = [s for s in self.sections if s not in known]
        if unknown:
            raise ValueError(f"--sections: unknown {unknown}; known: {', '.join(known)}")
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.eval_samples < 0:
            raise ValueError("--eval-samples must be >= 0 (0: the whole split)")


@dataclass
class ReportModel:
    """A checkpoint's model, in eval mode on the report's device."""

    name: str
    """How the report names it: "CapsNet", "CNN" or "CNN (baseline)"."""
    module: nn.Module
    checkpoint: Path
    epochs: int
    """Epochs it was trained for (the checkpoint's next epoch)."""
    trained_on: str | None = None
    """The run config's data.shards, when the checkpoint records it."""

    @property
    def is_capsnet(self) -> bool:
        return isinstance(self.module, CapsNet)

    def features(self) -> FeaturesFn:
        return capsnet_features(self.module) if self.is_capsnet else cnn_features(self.module)


@dataclass
class Context:
    models: list[ReportModel]
    """The checkpoint's model first, then the baseline if given."""
    info: DatasetInfo
    settings: ReportSettings
    device: torch.device
    out: Path
    lines: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, EvalResult] = field(default_factory=dict)
    samples: Batch | None = None

    @property
    def main(self) -> ReportModel:
        return self.models[0]

    def class_name(self, j: int) -> str:
        names = self.info.class_names
        return names[j] if j < len(names) else str(j)

    def evaluated(self, model: ReportModel) -> EvalResult:
        """`evaluate` over the whole split (once per model: sections share it)."""
        if model.name not in self.accuracy:
            self.accuracy[model.name] = evaluate(model.module, self.loader(), self.device)
        return self.accuracy[model.name]

    def loader(self):
        s = self.settings
        return open_loader(self.info, s.split, batch_size=s.batch_size, training=False)

    def figure(self, name: str, caption: str) -> Path:
        self.lines += [f"![{caption}]({name})", ""]
        return self.out / name

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.lines.append("")

    def skip(self, reason: str) -> None:
        self.lines += [f"*Skipped: {reason}.*", ""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _capsnet_reason(model: ReportModel, need_decoder: bool = False) -> str | None:
    """Why a capsule section does not apply to `model` (None: it does)."""
    if not model.is_capsnet:
        return f"the checkpoint is a {model.name}, which has no capsules"
    if need_decoder and model.module.decoder is None:
        return "the CapsNet has no decoder (model config decoder: false)"
    return None


# --------------------------------------------------------------------------- sections


def section_accuracy(ctx: Context) -> None:
    rows = []
    for model in ctx.models:
        result = ctx.evaluated(model)
        rows.append([model.name, result.accuracy, 1 - result.accuracy, result.coverage()])
    ctx.table(["model", "accuracy", "error", "over"], rows)
    ctx.numbers["accuracy"] = {n: r.accuracy for n, r in ctx.accuracy.items()}
    if ctx.info.label_kind != "index":
        ctx.lines += [
            "A sample counts as correct when its k highest scores are exactly its k classes.",
            "",
        ]
        ctx.skip("per-class accuracy and the confusion matrix need single-label data")
        return
    names = [ctx.class_name(j) for j in range(ctx.info.num_classes)]
    per_class = {n: r.per_class_accuracy() for n, r in ctx.accuracy.items()}
    ctx.numbers["per_class_accuracy"] = per_class
    ctx.table(
        ["class", *per_class],
        [[c, *(v[j] for v in per_class.values())] for j, c in enumerate(names)],
    )
    for k, (name, result) in enumerate(ctx.accuracy.items()):
        png = ctx.figure(f"confusion-{k}.png", f"{name}: confusion matrix (rows true class)")
        figures.save_confusion(result.confusion, png, f"{name}: accuracy {result.accuracy:.4f}")


def section_reconstructions(ctx: Context) -> None:
    if reason := _capsnet_reason(ctx.main, need_decoder=True):
        return ctx.skip(reason)
    images = ctx.samples.images[:8]
    recon, predicted = S.reconstruct_predicted(ctx.main.module, images)
    ctx.lines += ["Inputs (top) above their reconstructions from the longest capsule.", ""]
    png = ctx.figure("reconstructions.png", f"the first {len(images)} test images")
    figures.save_image_grid(
        torch.stack([images, recon]),
        png,
        ["input", "reconstruction"],
        [f"pred {ctx.class_name(int(j))}" for j in predicted],
    )


def section_perturbation(ctx: Context) -> None:
    if reason := _capsnet_reason(ctx.main, need_decoder=True):
        return ctx.skip(reason)
    images = ctx.samples.images[:3]
    decoded, winners = S.perturb_dimensions(ctx.main.module, images)
    offsets = S.PERTURBATION_OFFSETS
    ctx.lines += [
        f"Each of the D = {decoded.shape[1]} pose dimensions of the winning capsule moved by "
        f"{offsets[0]:+.2f} … {offsets[-1]:+.2f} in steps of 0.05 (columns) and decoded; "
        "one row per dimension.",
        "",
    ]
    for s in range(len(images)):
        png = ctx.figure(f"perturbation-{s}.png", f"test image {s}, capsule {int(winners[s])}")
        figures.save_image_grid(
            decoded[s],
            png,
            [f"dim {d}" for d in range(decoded.shape[1])],
            [f"{o:+.2f}" for o in offsets],
            f"test image {s}: winning capsule {int(winners[s])}",
        )


def section_equivariance(ctx: Context) -> None:
    images = ctx.samples.images
    features = {m.name: m.features() for m in ctx.models}
    results = S.equivariance(features, images, ctx.settings.batch_size)
    ctx.lines += [
        f"{len(images)} test images, each under known transforms: "
        + "; ".join(S.transform_description(k) for k in S.TRANSFORMS)
        + ". Features: the winning capsule's pose (CapsNet; the winner of the untransformed "
        "image) or the penultimate activations (CNN). R² is the fraction of the change in the "
        "features that an affine function of the transform parameters explains, pooled over "
        "images; features that change at random score about the chance R², P / (K − 1).",
        "",
    ]
    rows = []
    for e in results:
        r = e.result
        rows.append(
            [
                r.kind,
                e.model,
                r.r2,
                r.chance_r2,
                r.pose_change,
                _opt(r.length_change),
                _opt(r.winner_kept),
            ]
        )
    ctx.table(
        ["transform", "model", "R²", "chance R²", "pose change", "length change", "winner kept"],
        rows,
    )
    ctx.numbers["equivariance"] = [
        {"model": e.model, **{k: v for k, v in e.result.to_dict().items() if k != "per_image_r2"}}
        for e in results
    ]
    ctx.lines += [_equivariance_sentence(results), ""]
    png = ctx.figure("equivariance.png", "R² per transform and model; black: chance level")
    figures.save_equivariance(
        [{"model": e.model, "kind": e.result.kind, **_r2(e)} for e in results], png
    )


def _opt(value: float | None) -> Any:
    return "–" if value is None else value


def _r2(e: S.ModelEquivariance) -> dict[str, float]:
    return {"r2": e.result.r2, "chance_r2": e.result.chance_r2}


def _equivariance_sentence(results: list[S.ModelEquivariance]) -> str:
    """What the table means: per model, the transforms whose R² is well above chance."""
    parts = []
    for name in dict.fromkeys(e.model for e in results):
        mine = [e.result for e in results if e.model == name]
        above = [
            f"{r.kind} ({r.r2:.2f} vs {r.chance_r2:.2f})" for r in mine if r.r2 > 2 * r.chance_r2
        ]
        below = [r.kind for r in mine if r.r2 <= 2 * r.chance_r2]
        text = f"{name}: features follow " + (", ".join(above) if above else "no transform")
        text += " linearly, more than twice the chance R²"
        if below:
            text += f"; not above chance for {', '.join(below)}"
        parts.append(text)
    return (
        "**Reading:** an R² well above its chance level means the features move along a fixed "
        "linear map of the transform (equivariance); near chance, they change in a way "
        "unrelated to it or not at all. " + ". ".join(parts) + "."
    )


def section_affine(ctx: Context) -> None:
    info = ctx.info
    if info.source.get("dataset") != "affine-test":
        return ctx.skip(
            f"the shards are {info.name!r}, not the affine-test dataset "
            "(`capsnet shards --dataset affine-test`)"
        )
    limit = ctx.settings.eval_samples
    metadata = S.sample_metadata(info, ctx.settings.split, limit)
    models = {m.name: m.module for m in ctx.models}
    held = S.batches(ctx.loader(), ctx.device, limit)
    result = S.affine_robustness(models, held, metadata, info.source.get("test_ranges", {}))
    trained = "; ".join(
        f"{m.name} trained on {m.trained_on or 'unknown shards'}" for m in ctx.models
    )
    ctx.lines += [
        f"Accuracy on the first {result.samples:,} affine test images (random rotation, shear, "
        f"scale and translation; {trained}). The paper trains on translated 40×40 MNIST and "
        "tests on affNIST: CapsNet 79 %, CNN 66 %. Each image's rotation and shear are read "
        "from its own `json` field (the parameters it was rendered with), and the samples are "
        "binned by their magnitude.",
        "",
    ]
    ctx.table(["model", "accuracy"], [[n, a] for n, a in result.accuracy.items()])
    ctx.table(
        ["parameter", "magnitude bin", "samples", *result.accuracy],
        [
            [b.parameter, f"[{b.low:.3g}, {b.high:.3g})", b.samples, *b.accuracy.values()]
            for b in result.bins
        ],
    )
    ctx.numbers["affine"] = asdict(result)
    curves = {
        f"|{p}|": {
            n: (
                [(b.low + b.high) / 2 for b in result.bins if b.parameter == p and b.samples],
                [b.accuracy[n] for b in result.bins if b.parameter == p and b.samples],
            )
            for n in result.accuracy
        }
        for p in S.AFFINE_PARAMETERS
    }
    png = ctx.figure("affine.png", "accuracy against rotation and shear magnitude")
    figures.save_binned_accuracy(curves, png)


def section_overlapping(ctx: Context) -> None:
    if not ctx.info.part_fields:
        return ctx.skip(f"the shards are {ctx.info.name!r}, which has one object per image")
    results = {m.name: ctx.evaluated(m) for m in ctx.models}
    rows = [[n, r.accuracy, 1 - r.accuracy] for n, r in results.items()]
    ctx.lines += [
        "Two-object accuracy over the whole split: an image counts when both of its classes "
        "are the two highest scores (the two longest capsules); paper: 5.2 % error on "
        "MultiMNIST.",
        "",
    ]
    ctx.table(["model", "both correct", "error"], rows)
    ctx.numbers["overlapping"] = {n: r.accuracy for n, r in results.items()}
    if reason := _capsnet_reason(ctx.main, need_decoder=True):
        return ctx.skip(f"separate reconstructions: {reason}")
    shown = S.head(ctx.samples, 6)
    recon_BK, classes_BK = S.separate_objects(ctx.main.module, shown)
    K = recon_BK.shape[1]
    grid = torch.cat([shown.images[None], recon_BK.transpose(0, 1), shown.parts.transpose(0, 1)])
    labels = [
        "input",
        *(f"capsule {k + 1}" for k in range(K)),
        *(f"true {k + 1}" for k in range(K)),
    ]
    cols = [
        f"{','.join(map(str, c.tolist()))} / {','.join(map(str, t.tolist()))}"
        for c, t in zip(classes_BK, shown.part_classes, strict=True)
    ]
    ctx.lines += [
        f"Each object decoded from its own capsule: the {K} longest, matched to the true "
        "parts. Columns: predicted / true classes.",
        "",
    ]
    png = ctx.figure("overlapping.png", "inputs, each capsule's reconstruction, the true parts")
    figures.save_image_grid(grid, png, labels, cols, "predicted / true classes")


def section_routing(ctx: Context) -> None:
    if reason := _capsnet_reason(ctx.main):
        return ctx.skip(reason)
    model = ctx.main.module
    images = ctx.samples.images[:4]
    png = ctx.figure("couplings.png", "which primary capsules feed which class")
    names = [ctx.class_name(j) for j in range(ctx.info.num_classes)]
    figures.save_couplings(images, S.coupling_maps(model, images), png, names)
    trained = S.routing_iterations(model)
    if trained is None:
        return ctx.skip(
            f"iterations sweep: routing {model.config.routing.name!r} has no iterations setting"
        )
    held = list(S.batches(ctx.loader(), ctx.device, ctx.settings.eval_samples))
    rows = S.routing_sweep(model, held)
    n = sum(len(b) for b in held)
    ctx.lines += [
        f"Accuracy and time per batch ({ctx.settings.batch_size} images, {ctx.device}) on the "
        f"first {n:,} test samples with the routing run for 1–5 iterations at inference "
        f"(trained with {trained}).",
        "",
    ]
    ctx.table(
        ["iterations", "accuracy", "ms per batch"],
        [
            [
                f"{r.iterations}{' (trained)' if r.iterations == trained else ''}",
                r.accuracy,
                f"{r.ms_per_batch:.1f}",
            ]
            for r in rows
        ],
    )
    ctx.numbers["routing_iterations"] = [asdict(r) for r in rows]


@dataclass(frozen=True)
class Section:
    name: str
    """For --sections and the progress lines."""
    title: str
    """Its heading in report.md."""
    write: Callable[[Context], None]


SECTIONS = (
    Section("accuracy", "Accuracy, per-class accuracy and confusion matrix", section_accuracy),
    Section("reconstructions", "Reconstructions", section_reconstructions),
    Section("perturbation", "Dimension perturbation (paper Fig. 4)", section_perturbation),
    Section("equivariance", "Pose equivariance", section_equivariance),
    Section("affine", "Affine robustness", section_affine),
    Section("overlapping", "Overlapping digits", section_overlapping),
    Section("routing", "Routing", section_routing),
)
"""Every section, in report order."""


# --------------------------------------------------------------------------- the report


@contextmanager
def _progress(name: str) -> Iterator[None]:
    print(f"report: {name} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"report: {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def write_report(
    models: list[ReportModel],
    info: DatasetInfo,
    out: Path,
    settings: ReportSettings,
    *,
    command: str,
    device: torch.device,
) -> Path:
    """Run every section and write out/report.md, out/report.json and the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    for m in models:
        m.module.to(device).eval()
    ctx = Context(models, info, settings, device, out)
    ctx.samples = S.take_samples(ctx.loader(), device, settings.samples)
    _header(ctx, command)
    with torch.no_grad():
        for section in SECTIONS:
            ctx.lines += [f"## {section.title}", ""]
            if settings.sections and section.name not in settings.sections:
                ctx.skip(f"not requested (--sections {','.join(settings.sections)})")
                continue
            with _progress(section.name):
                section.write(ctx)
    path = out / "report.md"
    path.write_text("\n".join(ctx.lines).rstrip() + "\n")
    numbers = {"command": command, **ctx.numbers}
    (out / "report.json").write_text(json.dumps(_finite(numbers), indent=2) + "\n")
    return path


def _header(ctx: Context, command: str) -> None:
    info, split = ctx.info, ctx.settings.split
    ctx.lines += [
        f"# Capsule report: {ctx.main.name} on {info.name}",
        "",
        "Every number and figure below was produced by this command:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    rows = [
        [
            m.name,
            f"`{m.checkpoint}`",
            f"{sum(p.numel() for p in m.module.parameters()):,}",
            m.epochs,
            m.trained_on or "–",
        ]
        for m in ctx.models
    ]
    ctx.table(["model", "checkpoint", "parameters", "epochs", "trained on"], rows)
    total = info.split(split).num_samples
    ctx.lines += [
        f"Data: `{info.base_url}` ({info.name}, {'×'.join(map(str, info.image_shape))}, "
        f"split {split!r} of {total:,} samples). Measures and pictures use the first "
        f"{len(ctx.samples):,} test images; device {ctx.device}.",
        "",
    ]


def _finite(value: Any) -> Any:
    """JSON without NaN: an empty bin's accuracy becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
