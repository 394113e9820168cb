"""Every shell command shown in README.md and docs/*.md runs here, so no example goes stale.

How (the convention the docs follow is in doc_commands.py's docstring): each ```bash fence
of the docs is one test. Its commands run in order in a fresh workspace laid out like a
checkout (conftest.py: copies of configs/, cluster/ and pyproject.toml, links to the code,
MNIST-format files in data/MNIST/raw, an empty HOME), with the venv's `capsnet` first on
PATH. Each command runs by the rule its first words match (doc_commands.RULES, longest
prefix wins); a command without a rule fails:

| command                                 | how it runs here                                  |
| --------------------------------------- | ------------------------------------------------- |
| capsnet shards / eval / report          | for real, on few samples (shrinking, below)       |
| capsnet train / smoke without --local   | ray run: for real, with Ray; local run: + --local |
| capsnet train --local, --dry-run, ...   | for real, every tier                              |
| capsnet tune                            | ray run: a real 1-trial search; local: --dry-run  |
| capsnet submit (make train-cluster)     | + --dry-run: the config is checked and the        |
|                                         | `ray job submit` command printed; no cluster      |
| make TARGET                             | each line of the recipe `make -n TARGET VARS`     |
|                                         | prints, by its own rule (no reinstall)            |
| make help                               | for real                                          |
| make install / lint / format / bench    | the target must exist: they reinstall (network),  |
|                                         | check code this test does not own, rewrite files, |
|                                         | or run for minutes                                |
| make test / test-fast (pytest)          | --collect-only: running it would run this test    |
| ray up / down / dashboard / start /     | `TOOL SUB --help` must list every flag used and   |
| stop / job, kubectl apply /             | the files named must exist: they need a real      |
| port-forward, aws s3, gsutil,           | cloud, cluster or bucket, run until stopped, or   |
| tensorboard                             | (ray stop) stop every Ray instance of the machine |
| kubectl create secret                   | + --dry-run=client -o yaml (offline)              |
| sbatch [--export=...] FILE              | bash -n FILE; DRY_RUN=1 bash FILE prints the srun |
|                                         | line, whose capsnet part runs with --print-config |
| ray get-auth-token --generate           | for real, into the workspace's HOME               |
| export A=B                              | evaluated by bash; kept for the block's commands  |

Shrinking (doc_commands.SHRINK_*; appended only for what the doc command does not set
itself, so an example that sets, say, train.epochs keeps its value): capsnet train, smoke and
tune get `--set train.epochs=1 --set train.max_steps_per_epoch=2 --set train.batch_size=8
--set train.eval_batch_size=100 --set data.loader_workers=0 --set model.preset=tiny --set
run.cpus_per_worker=1`; tune also `search.num_samples=1`, `search.max_concurrent_trials=1`,
`search.scheduler={type: fifo}` and every `grid:` of the space cut to its first value; smoke
(which writes its own shards) `--train-samples 300 --test-samples 100 --min-accuracy 0`
(two steps cannot meet its accuracy floor; BENCHMARKS.md times the real `make smoke`);
shards `--train-samples 300 --test-samples 100`; eval `--loader-workers 0`; report
`--samples 4 --eval-samples 50`. /tmp/capsnet/ in a command becomes the workspace's
tmp/capsnet/. A block that reads /usr/share/datasets/fashion-mnist is skipped where that is
absent (CI installs it).

Tiers:
* fast (no marker, seconds): every command has a rule; every
  capsnet command of a block (make recipes expanded) parses and its config loads with its
  --set overrides (submit: with the cluster rules); fences follow the convention; inline
  capsnet spans name real options and make spans real targets; links resolve; README's
  Layout names what is there; README.md is at most 200 lines; ```python blocks run.
* `slow`: the "local" run of every block, Ray starts replaced as above (no Ray needed).
* `ray`: the "ray" run of a block that starts Ray, as written (also `slow` with a search or
  two Ray starts).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import (
    COMMAND_FENCE,
    COMMAND_LIKE,
    DOC_FILES,
    FASHION_MNIST,
    PYTHON_FENCE,
    REFUSED_FENCES,
    REPO,
    Workspace,
    all_blocks,
    commands,
    expand,
    inline_spans,
    ray_starts,
    read_blocks,
    rule_for,
)

BLOCKS = all_blocks()
BASH = [b for b in BLOCKS if b.lang == COMMAND_FENCE]
PYTHON = [b for b in BLOCKS if b.lang == PYTHON_FENCE]


def _params():
    """Each bash block: a "local" run (Ray starts replaced), slow; and, if it starts Ray, a
    "ray" run as written (also slow with a search or more than one Ray start)."""
    for block in BASH:
        yield pytest.param(block, "local", id=block.id, marks=pytest.mark.slow)
        starts = ray_starts(commands(block))
        if starts:
            searches = any(c.tokens[:2] == ["capsnet", "tune"] for c in commands(block))
            marks = [pytest.mark.ray] + ([pytest.mark.slow] if starts > 1 or searches else [])
            yield pytest.param(block, "ray", id=f"{block.id}-ray", marks=marks)


@pytest.mark.parametrize("block,tier", list(_params()))
def test_doc_block_runs(block, tier, workspace):
    if any(FASHION_MNIST in line for line in block.body) and not Path(FASHION_MNIST).is_dir():
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {FASHION_MNIST}")
    ws = Workspace(workspace, tier)
    failure = ""
    for command in commands(block):
        try:
            ws.run(command)
        except AssertionError as err:
            failure = f"{command.doc}:{command.line}: {err}"
            break
    if failure:
        pytest.fail(failure, pytrace=False)


def _capsnet_commands():
    """(where, argv after `capsnet`) of every capsnet command in a bash block, make recipes
    expanded."""
    env = dict(os.environ)
    for block in BASH:
        for command in commands(block):
            for tokens, _ in expand(command.tokens, env):
                if Path(tokens[0]).name == "capsnet":
                    yield f"{command.doc}:{command.line}", tokens[1:]


def test_doc_capsnet_commands_parse_and_their_configs_load(monkeypatch):
    """The fast tier's check of the blocks, in this process: every capsnet command parses,
    and the config it names loads with its --set overrides (`capsnet submit`: with its
    cluster rules, relative paths refused)."""
    from pipeline.cli import build_parser
    from pipeline.config import load_config
    from pipeline.submit import validate_locally
    from pipeline.tune import load_tune_config

    monkeypatch.chdir(REPO)
    parser, bad = build_parser(), []
    for where, argv in _capsnet_commands():
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()) as err,
            ):
                args = parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code:
                bad.append(f"{where}: capsnet {shlex.join(argv)}: {err.getvalue().strip()}")
            continue
        config, overrides = getattr(args, "config", None), getattr(args, "overrides", [])
        try:
            if argv[0] == "train":
                load_config(config, overrides)
            elif argv[0] == "tune":
                load_tune_config(config, overrides)
            elif argv[0] == "submit":  # argv[1]: train or tune
                validate_locally(argv[1], Path(config), overrides)
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            bad.append(f"{where}: capsnet {shlex.join(argv)}: {error}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_doc_python_runs(block, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "\n".join(block.body)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_every_command_has_a_rule():
    env, missing = dict(os.environ), []
    for block in BASH:
        for command in commands(block):
            if rule_for(command.tokens) is None:
                missing.append(f"{command.doc}:{command.line}: {command.text}")
                continue
            for tokens, _ in expand(command.tokens, env):
                if rule_for(tokens) is None:
                    missing.append(f"{command.doc}:{command.line}: recipe line {tokens}")
    assert not missing, "commands without a rule in doc_commands.RULES:\n" + "\n".join(missing)


def test_fences_follow_the_convention():
    problems = []
    for block in BLOCKS:
        if block.lang in REFUSED_FENCES:
            problems.append(
                f"{block.id}: ```{block.lang}: commands go in ```bash, the rest in "
                "```text (or its language)"
            )
        elif block.lang == COMMAND_FENCE:
            problems += [
                f"{block.id}: no prompts in a bash fence: {line.strip()}"
                for line in block.body
                if line.lstrip().startswith("$ ")
            ]
        elif block.lang != PYTHON_FENCE:
            problems += [
                f"{block.id}: a command in a ```{block.lang} fence is never run: {line.strip()}"
                for line in block.body
                if COMMAND_LIKE.match(line)
            ]
    assert not problems, "\n".join(problems)


def _capsnet_options() -> dict[str, set[str]]:
    """{subcommand: its option strings} from capsnet's own parser."""
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {"": set(parser._option_string_actions)}
    for name, subparser in sub.choices.items():
        out[name] = set(subparser._option_string_actions)
    return out


def test_inline_capsnet_spans_name_real_options():
    """`capsnet SUB --opt ...` in the prose (not run): SUB and every --opt must exist."""
    known, bad = _capsnet_options(), []
    for doc in DOC_FILES:
        for line, span in inline_spans(doc):
            if not span.startswith("capsnet "):
                continue
            words = shlex.split(span.replace("…", "X"))
            sub = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
            if sub not in known:
                bad.append(f"{doc}:{line}: `{span}`: no subcommand {sub!r}")
                continue
            opts = [w.partition("=")[0] for w in words[2 if sub else 1 :] if w.startswith("--")]
            bad += [
                f"{doc}:{line}: `{span}`: capsnet {sub} has no {o}"
                for o in opts
                if o not in known[sub]
            ]
    assert not bad, "\n".join(bad)


def test_inline_make_targets_exist():
    listing = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    targets = {line.split()[0] for line in listing.splitlines() if line.strip()}
    bad = [
        f"{doc}:{line}: `{span}`"
        for doc in DOC_FILES
        for line, span in inline_spans(doc)
        if span.startswith("make ") and span.split()[1] not in targets
    ]
    assert not bad, "make targets that do not exist:\n" + "\n".join(bad)


def test_readme_is_at_most_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = [
        line.lstrip("#").strip()
        for line in path.read_text().splitlines()
        if re.match(r"^#{1,6} ", line)
    ]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_relative_links_resolve():
    """Links to files in the repository, and to headings (#anchor), lead somewhere."""
    bad = []
    for doc in DOC_FILES:
        base = (REPO / doc).parent
        for n, line in enumerate((REPO / doc).read_text().splitlines(), start=1):
            for target, anchor in LINK.findall(line):
                if "://" in target:
                    continue
                path = base / target if target else REPO / doc
                if not path.exists():
                    bad.append(f"{doc}:{n}: {target}")
                elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                    bad.append(f"{doc}:{n}: {target}#{anchor}: no such heading")
    assert not bad, "links that lead nowhere:\n" + "\n".join(bad)


def test_layout_names_what_is_there():
    """README's Layout block: the first word of each line is a path (under the folder of the
    line it is indented under) that exists."""
    start = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    block = next(
        b for b in read_blocks("README.md") if b.body and b.body[0].startswith("capscore/")
    )
    assert block.body[0] in start
    parents: list[tuple[int, Path]] = []
    missing = []
    for line in block.body:
        if not line.strip() or line.startswith(" " * 8):  # a continued description
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        parents = [(i, p) for i, p in parents if i < indent]
        path = (parents[-1][1] if parents else REPO) / name
        if not path.exists():
            missing.append(str(path.relative_to(REPO)))
        if name.endswith("/"):
            parents.append((indent, path))
    assert not missing, f"README's Layout names what is not there: {missing}"


def test_submit_refuses_a_local_config_as_the_readme_says(monkeypatch):
    """README and cluster.md: `capsnet submit` refuses configs/smoke.yaml (relative shards
    would point inside the job's copy of the repo); configs/cluster/ configs pass."""
    from pipeline.submit import SubmitError, validate_locally

    monkeypatch.chdir(REPO)
    with pytest.raises(SubmitError, match="relative path"):
        validate_locally("train", Path("configs/smoke.yaml"), [])
    assert validate_locally("train", Path("configs/cluster/mnist-16gpu.yaml"), [])


def test_training_md_lists_the_resume_safe_keys():
    """docs/training.md names every key a resumed run may change, and no other."""
    from pipeline.config import resume_safe_keys

    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## Rerunning resumes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`((?:data|train|run|debug)\.[\w*]+)`", section))
    listed -= {"train.lr"}  # named as the example of a key that may not change
    assert listed == set(resume_safe_keys())
