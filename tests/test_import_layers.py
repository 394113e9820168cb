"""Data flows downwards only: no module imports from a layer above its own.

Layers, bottom to top (a module may import its own layer and any below):
    capscore -> schema/torch_utils/figures -> data -> config -> train/evaluate
    -> report/tune/submit -> commands -> cli

evaluate sits beside train: the loop evaluates every epoch, and evaluating a checkpoint reads
it with pipeline.train.checkpoint. Commands import no other command (what two share lives with
its owner below them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # (rank, module prefixes)
    (0, ("capscore",)),
    (1, ("pipeline.schema", "pipeline.torch_utils", "pipeline.figures", "pipeline.redact")),
    (2, ("pipeline.data",)),
    (3, ("pipeline.config",)),
    (4, ("pipeline.train", "pipeline.evaluate")),
    (5, ("pipeline.report", "pipeline.tune", "pipeline.submit")),
    (6, ("pipeline.commands",)),
    (7, ("pipeline.cli",)),
]


def rank(module: str) -> int | None:
    if module == "pipeline":  # the package root: a docstring, no imports
        return 1
    best = None
    for r, prefixes in LAYERS:
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                best = r
    return best


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted([*ROOT.glob("capscore/**/*.py"), *ROOT.glob("pipeline/**/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out.append((name, path))
    return out


def imported(path: Path, package: str) -> set[str]:
    """Every module an import statement names, top-level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            names.add(base)
            names |= {
                f"{base}.{a.name}" for a in node.names if rank(f"{base}.{a.name}") is not None
            }
    return names


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_no_import_from_a_layer_above(name, path):
    own = rank(name)
    assert own is not None, f"{name} is in no layer: add it to LAYERS"
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    upward = sorted(m for m in imported(path, package) if (r := rank(m)) is not None and r > own)
    assert not upward, f"{name} (layer {own}) imports from above: {upward}"


def test_the_package_roots_are_layered():
    # `from pipeline import tune` names pipeline.tune; `import pipeline` alone names no layer.
    assert rank("pipeline.tune") == 5 and rank("pipeline.data.loader") == 2


COMMAND_MODULES = [(n, p) for n, p in modules() if n.startswith("pipeline.commands.")]


@pytest.mark.parametrize("name, path", COMMAND_MODULES, ids=[n for n, _ in COMMAND_MODULES])
def test_commands_do_not_import_each_other(name, path):
    """A command is a thin parser + handler over the layers below; what two commands share
    lives with its owner there (pipeline.evaluate, ...), not in one of them."""
    others = {n for n, _ in COMMAND_MODULES} - {name}
    package = name.rsplit(".", 1)[0]
    shared = sorted(imported(path, package) & others)
    assert not shared, f"{name} imports another command: {shared}"


def test_every_command_module_is_checked():
    # `from pipeline.commands import eval` names pipeline.commands.eval (see `imported`).
    assert {"pipeline.commands.eval", "pipeline.commands.report"} <= {n for n, _ in COMMAND_MODULES}
    assert "pipeline.commands.eval" in imported(ROOT / "pipeline/cli.py", "pipeline")
