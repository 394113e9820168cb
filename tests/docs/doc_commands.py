"""Reading README.md and docs/*.md, and running the shell commands shown there.

The convention the docs follow (test_doc_commands.py enforces it):

* A ```bash fence holds commands a reader runs, one per line (`\\` continues a line; `# ...`
  comments; `&&` chains; a trailing `&` only on a help-checked tool). Each fence is a
  self-contained script: it runs top to bottom in a fresh workspace laid out like a checkout
  (conftest.py). Output, YAML, formulas and file trees go in ```text / ```yaml fences;
  ```python fences are run too. ```sh, ```shell, ```console and fences without a language are
  refused, and so is a command-looking line in any other fence: it would never be tested.
* Inline `capsnet ...` spans are references, not run; they must parse with capsnet's own
  argument parser. Inline `make TARGET` spans must name a target `make help` lists.

Every command in a bash fence, and every line of a make recipe it expands to, must match a
rule in RULES (longest token prefix wins); a command without one fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

COMMAND_FENCE = "bash"
PYTHON_FENCE = "python"
REFUSED_FENCES = {"sh", "shell", "console", "zsh", ""}
COMMAND_LIKE = re.compile(r"^\s*(\$ )?(capsnet|make|ray|kubectl|sbatch|aws|gsutil|pip) [\w-]+( |$)")
FENCE = re.compile(r"^\s*(?P<ticks>```+|~~~+)\s*(?P<info>[^`\s]*)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


# --- reading the docs ---------------------------------------------------------------------------


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    body: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Command:
    text: str  # one simple command: continuations joined, comment and `&&` removed
    doc: str
    line: int
    background: bool = False

    @property
    def tokens(self) -> list[str]:
        return shlex.split(self.text)


def read_blocks(doc: str) -> list[Block]:
    """Every fenced block of a Markdown file, with its language (the info string's first word)."""
    blocks: list[Block] = []
    current: Block | None = None
    closing = ""
    for n, line in enumerate((REPO / doc).read_text().splitlines(), start=1):
        m = FENCE.match(line)
        if current is None and m:
            current, closing = Block(doc, n, m["info"].lower()), m["ticks"]
        elif current is not None and line.strip() == closing:
            blocks.append(current)
            current = None
        elif current is not None:
            current.body.append(line)
    assert current is None, f"{doc}: the fence opened at line {current.line} is never closed"
    return blocks


def all_blocks() -> list[Block]:
    return [b for doc in DOC_FILES for b in read_blocks(doc)]


def _scan(line: str):
    """(index, char, at top level) for each char: outside quotes and $(...)."""
    quote, depth = "", 0
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
            yield i, ch, False
            continue
        if ch in "'\"":
            quote = ch
        elif line.startswith("$(", i):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        yield i, ch, not quote and not depth


def _strip_comment(line: str) -> str:
    for i, ch, top in _scan(line):
        if top and ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_and(line: str) -> list[str]:
    cuts = [i for i, ch, top in _scan(line) if top and line.startswith("&&", i)]
    cuts = [c for k, c in enumerate(cuts) if k == 0 or c != cuts[k - 1] + 1]
    bounds = [0, *[c for cut in cuts for c in (cut, cut + 2)], len(line)]
    return [line[a:b].strip() for a, b in zip(bounds[::2], bounds[1::2], strict=True)]


def commands(block: Block) -> list[Command]:
    """The simple commands of a bash block, in order."""
    out: list[Command] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.body, start=1):
        if not pending:
            first = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text, pending = _strip_comment(pending + raw).strip(), ""
        for part in _split_and(text) if text else []:
            background = part.endswith("&")
            part = part.removesuffix("&").strip()
            out.append(Command(" ".join(part.split()), block.doc, first, background))
    assert not pending, f"{block.id}: a line ends with \\ but nothing follows"
    return out


def inline_spans(doc: str) -> list[tuple[int, str]]:
    """Inline code spans outside fences, as (line, text)."""
    out, in_fence = [], False
    for n, line in enumerate((REPO / doc).read_text().splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            out += [(n, m.group(1)) for m in INLINE.finditer(line)]
    return out


# --- the rules ----------------------------------------------------------------------------------

RUN = "run"  # as written, plus the SHRINK options the doc command does not set
RAY = "ray"  # starts Ray as written: the "ray" run of a block runs it so (+ SHRINK); the
#              "local" run with --local (train, smoke) or --dry-run (tune) instead
DRY_RUN = "dry-run"  # as written + the tool's dry run (--dry-run; kubectl: --dry-run=client)
MAKE = "make"  # `make -n TARGET VARS` gives the recipe; each line is run by its own rule
HELP = "help"  # needs a real cluster, cloud or bucket and has no dry run: `TOOL SUB --help`
#               must list every flag used, and the files named must exist; make: the target
#               must exist
SCRIPT = "script"  # sbatch: `bash -n`, then the script's DRY_RUN=1 mode, whose capsnet
#                   entrypoint is checked with --print-config
ENV = "env"  # export: evaluated by bash, the variables kept for the block's next commands
COLLECT = "collect"  # pytest: --collect-only (running the suite here would run this test again)
IN_REPO = "in-repo"  # run as written in the repository (`make help`)


@dataclass(frozen=True)
class Rule:
    kind: str
    why: str


RULES: dict[tuple[str, ...], Rule] = {
    ("capsnet",): Rule(RUN, "`capsnet --help`, `capsnet --version`"),
    ("capsnet", "shards"): Rule(RUN, "writes real shards, few samples"),
    ("capsnet", "train"): Rule(RAY, "real training on tiny data"),
    ("capsnet", "tune"): Rule(RAY, "a real one-trial search on tiny data"),
    ("capsnet", "smoke"): Rule(RAY, "the real smoke job on a few hundred images"),
    ("capsnet", "eval"): Rule(RUN, "real evaluation of the block's own checkpoint"),
    ("capsnet", "report"): Rule(RUN, "a real report of the block's own checkpoints"),
    ("capsnet", "submit"): Rule(
        DRY_RUN,
        "needs a running cluster: --dry-run validates the "
        "config (relative paths refused) and prints `ray job submit`",
    ),
    ("make",): Rule(MAKE, "the recipe, each line by its own rule (no reinstall)"),
    ("make", "help"): Rule(IN_REPO, "prints the targets"),
    ("make", "install"): Rule(HELP, "installs the venv (network, minutes)"),
    ("make", "format"): Rule(HELP, "rewrites files"),
    ("make", "lint"): Rule(HELP, "CI's own step, over code this test does not own"),
    ("make", "bench"): Rule(HELP, "minutes of benchmarks (BENCHMARKS.md)"),
    ("python", "-m", "pytest"): Rule(COLLECT, "the test suite itself"),
    ("ray", "up"): Rule(HELP, "creates cloud VMs"),
    ("ray", "down"): Rule(HELP, "deletes cloud VMs"),
    ("ray", "dashboard"): Rule(HELP, "an SSH tunnel to a launcher cluster's head"),
    ("ray", "start"): Rule(
        HELP,
        "machine-wide Ray daemons; tests/cluster/test_cluster_e2e.py "
        "runs this 2-node sequence with ports and a stop of its own",
    ),
    ("ray", "stop"): Rule(HELP, "stops every Ray instance of the machine, other tests' too"),
    ("ray", "job"): Rule(HELP, "a running cluster's Jobs API"),
    ("ray", "get-auth-token"): Rule(RUN, "writes the token under the workspace's HOME"),
    ("aws", "s3"): Rule(HELP, "a bucket and credentials (S3 runs: tests/pipeline, on moto)"),
    ("gsutil",): Rule(HELP, "a bucket and credentials"),
    ("kubectl", "apply"): Rule(
        HELP,
        "a Kubernetes cluster (tests/cluster validates the manifests against the KubeRay schema)",
    ),
    ("kubectl", "port-forward"): Rule(HELP, "a Kubernetes cluster"),
    ("kubectl", "create", "secret"): Rule(DRY_RUN, "offline with --dry-run=client -o yaml"),
    ("sbatch",): Rule(SCRIPT, "SLURM is not installed here"),
    ("export",): Rule(ENV, "sets variables for the block's next commands"),
    ("tensorboard",): Rule(HELP, "a server that runs until stopped"),
}

#: Appended to shrink a command, for each option or --set key the doc command does not set
#: itself (so an example that sets, say, train.epochs keeps its value).
SHRINK_SHARDS = {"--train-samples": "300", "--test-samples": "100"}
SHRINK_TRAIN = {
    "train.epochs": "1",
    "train.max_steps_per_epoch": "2",
    "train.batch_size": "8",
    "train.eval_batch_size": "100",
    "data.loader_workers": "0",
    "model.preset": "tiny",
    "run.cpus_per_worker": "1",
}
SHRINK_TUNE = {
    "search.num_samples": "1",
    "search.max_concurrent_trials": "1",
    "search.scheduler": "{type: fifo}",
}  # and each `grid:` of the space cut to its first value
SHRINK_SMOKE = {"--train-samples": "300", "--test-samples": "100", "--min-accuracy": "0"}
SHRINK_EVAL = {"--loader-workers": "0"}
SHRINK_REPORT = {"--samples": "4", "--eval-samples": "50"}
#: Absolute paths outside the workspace that a doc command writes to -> inside it.
REWRITES = {"/tmp/capsnet/": "{ws}/tmp/capsnet/"}


def rule_for(tokens: list[str]) -> tuple[tuple[str, ...], Rule] | None:
    """The rule with the longest matching token prefix (a venv path counts as the tool)."""
    if not tokens:
        return None
    words = [Path(tokens[0]).name if "/" in tokens[0] else tokens[0], *tokens[1:]]
    for n in range(min(len(words), 3), 0, -1):
        if tuple(words[:n]) in RULES:
            return tuple(words[:n]), RULES[tuple(words[:n])]
    return None


def set_keys(tokens: list[str]) -> set[str]:
    """The dotted keys a command sets with `--set KEY=VALUE`."""
    return {tokens[i + 1].partition("=")[0] for i, tok in enumerate(tokens[:-1]) if tok == "--set"}


def options(tokens: list[str]) -> set[str]:
    return {t.partition("=")[0] for t in tokens if t.startswith("-")}


def _subcommand(tokens: list[str]) -> str:
    is_capsnet = bool(tokens) and Path(tokens[0]).name == "capsnet"
    return tokens[1] if is_capsnet and len(tokens) > 1 else ""


def starts_ray(tokens: list[str]) -> bool:
    """Whether a capsnet command starts (or joins) Ray as written."""
    sub, opts = _subcommand(tokens), options(tokens)
    if opts & {"--help", "-h", "--dry-run", "--print-config"}:
        return False
    return sub == "tune" or (sub in ("train", "smoke") and "--local" not in opts)


def make_recipe(args: list[str], env: dict[str, str]) -> list[str]:
    """The lines `make -n` prints for a target (the venv taken as installed)."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if out.returncode:
        raise AssertionError(f"make -n {shlex.join(args)}: {out.stderr.strip()}")
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def expand(tokens: list[str], env: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
    """What a command really runs: itself, or a make target's recipe lines (`.venv/bin/X` as
    the running venv's X), with the make variables of the command line in their environment
    (make exports them to the recipe)."""
    found = rule_for(tokens)
    if found is None or found[1].kind != MAKE:
        return [(tokens, {})]
    assigns = dict(a.split("=", 1) for a in tokens[1:] if "=" in a and not a.startswith("-"))
    out = []
    for line in make_recipe(tokens[1:], {**env, **assigns}):
        words = shlex.split(line)
        if words[0].startswith(".venv/bin/"):
            words[0] = str(VENV_BIN / Path(words[0]).name)
        out.append((words, assigns))
    return out


def ray_starts(commands_: list[Command]) -> int:
    env = dict(os.environ)
    return sum(starts_ray(t) for c in commands_ for t, _ in expand(c.tokens, env))


def _grid_overrides(tokens: list[str], cwd: Path) -> list[str]:
    """A search runs every value of a `grid:` entry: keep the first of each."""
    if "--config" not in tokens:
        return []
    raw = yaml.safe_load((cwd / tokens[tokens.index("--config") + 1]).read_text()) or {}
    space = (raw.get("search") or {}).get("space") or {}
    given = set_keys(tokens)
    return [
        f"search.space.{key}={{grid: [{yaml.safe_dump(spec['grid'][0]).split(chr(10))[0]}]}}"
        for key, spec in space.items()
        if isinstance(spec, dict) and "grid" in spec and f"search.space.{key}" not in given
    ]


def shrink(tokens: list[str], tier: str, cwd: Path) -> list[str]:
    """What the test appends to a capsnet command: the SHRINK tables (only what the command
    does not set), and in a "local" run --local / --dry-run instead of a Ray start."""
    sub, opts, keys = _subcommand(tokens), options(tokens), set_keys(tokens)
    if not sub or opts & {"--help", "-h"}:
        return []
    extra: list[str] = []
    opt_table = {
        "shards": SHRINK_SHARDS,
        "eval": SHRINK_EVAL,
        "report": SHRINK_REPORT,
        "smoke": SHRINK_SMOKE,
    }.get(sub, {})
    for opt, value in opt_table.items():
        if opt not in opts:
            extra += [opt, value]
    if sub in ("train", "tune", "smoke") and "--print-config" not in opts:
        sets = dict(SHRINK_TRAIN)
        if sub == "tune":
            sets |= SHRINK_TUNE
        if sub == "smoke":  # smoke writes its own shards and names its run
            sets = {k: v for k, v in sets.items() if not k.startswith("data.")}
        for key, value in sets.items():
            if key not in keys:
                extra += ["--set", f"{key}={value}"]
        if sub == "tune":
            for item in _grid_overrides(tokens, cwd):
                extra += ["--set", item]
    if tier == "local" and starts_ray(tokens):
        extra.append("--dry-run" if sub == "tune" else "--local")
    return extra


# --- running a block ----------------------------------------------------------------------------

FILE_ARG = re.compile(r"^[\w./-]+\.(ya?ml|sbatch|json|sh)$")


def help_argv(tokens: list[str]) -> list[str]:
    tool = tokens[0]
    name = Path(tool).name
    if name == "aws":
        return [*tokens[:3], "help"]
    if name == "gsutil":
        return [tool, "help", tokens[1]]
    if name in ("ray", "kubectl"):
        return [*tokens[:2], "--help"]
    return [tool, "--help"]


class Workspace:
    """Runs a doc block's commands in order, in one folder, with one environment."""

    TIMEOUT_S = {"local": 240, "ray": 480}

    def __init__(self, root: Path, tier: str):
        self.root, self.tier, self.log = root, tier, []
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "CAPSNET_", "PYTEST_", "WANDB_", "MLFLOW_"))
        }
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            HOME=str(root / "home"),
            MPLBACKEND="Agg",
            PYTHONUNBUFFERED="1",
            AWS_PAGER="",
        )

    def sh(self, command, *, env=None, cwd=None, check=True, timeout=None) -> str:
        """Run a command line (a list is quoted) with bash; on failure raise with its output."""
        text = command if isinstance(command, str) else shlex.join(command)
        self.log.append(f"$ {text}")
        proc = subprocess.run(
            ["bash", "-c", text],
            cwd=cwd or self.root,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout or self.TIMEOUT_S[self.tier],
        )
        out = proc.stdout + proc.stderr
        self.log.append(out[-2000:])
        if check and proc.returncode:
            raise AssertionError(f"exit {proc.returncode}: {text}\n{out[-6000:]}")
        return out

    def run(self, command: Command) -> None:
        text = command.text
        for old, new in REWRITES.items():
            text = text.replace(old, new.format(ws=self.root))
        tokens = shlex.split(text)
        found = rule_for(tokens)
        if found is None:
            raise AssertionError(f"no rule for `{text}` (add one to RULES)")
        if command.background and found[1].kind != HELP:
            raise AssertionError(f"only help-checked commands may end with `&`: {text}")
        if found[1].kind == MAKE:
            for words, assigns in expand(tokens, self.env):
                self.run_tokens(words, {**self.env, **assigns})
        else:
            self.run_tokens(tokens, self.env, text)

    def run_tokens(self, tokens: list[str], env: dict[str, str], text: str = "") -> None:
        found = rule_for(tokens)
        if found is None:
            raise AssertionError(f"no rule for the recipe line `{shlex.join(tokens)}`")
        key, rule = found
        text = text or shlex.join(tokens)
        if rule.kind in (RUN, RAY):
            extra = shrink(tokens, self.tier, self.root)
            self.sh(f"{text} {shlex.join(extra)}".strip(), env=env)
        elif rule.kind == DRY_RUN and shutil.which(tokens[0], path=env["PATH"]) is None:
            self.log.append(f"(not run: {tokens[0]} is not installed here)")
        elif rule.kind == DRY_RUN:
            extra = ["--dry-run=client", "-o", "yaml"] if key[0] == "kubectl" else ["--dry-run"]
            self.sh(
                text if "--dry-run" in options(tokens) else f"{text} {shlex.join(extra)}", env=env
            )
        elif rule.kind == IN_REPO:
            self.sh(["make", "--no-print-directory", "-C", str(REPO), *tokens[1:]], env=env)
        elif rule.kind == ENV:
            names = [t.split("=", 1)[0] for t in tokens[1:] if "=" in t]
            shown = " ".join(f'"${{{n}}}"' for n in names)
            out = self.sh(f"{text} && printf '%s\\0' {shown}", env=env)
            values = out.split("\0")[: len(names)]
            self.env.update(zip(names, values, strict=True))
        elif rule.kind == COLLECT:
            self.sh(
                [sys.executable, *tokens[1:], "--collect-only", "-q", "-p", "no:cacheprovider"],
                env=env,
                cwd=REPO,
            )
        elif rule.kind == SCRIPT:
            self.script_check(tokens, env)
        elif rule.kind == HELP:
            self.help_check(tokens, key, env)
        else:  # pragma: no cover
            raise AssertionError(rule.kind)

    def script_check(self, tokens: list[str], env: dict[str, str]) -> None:
        """sbatch [--export=ALL,K=V,...] FILE: parses, and its DRY_RUN=1 mode prints an srun
        line whose capsnet entrypoint loads its config (--print-config)."""
        script = next(t for t in tokens[1:] if FILE_ARG.match(t))
        exports = {}
        for tok in tokens[1:]:
            if tok.startswith("--export="):
                exports |= dict(kv.split("=", 1) for kv in tok[9:].split(",") if "=" in kv)
        self.sh(["bash", "-n", script], env=env)
        out = self.sh(["bash", script], env={**env, **exports, "DRY_RUN": "1"})
        argv = shlex.split(next(line for line in out.splitlines() if "pipeline.cli" in line))
        entry = argv[argv.index("pipeline.cli") + 1 :]
        self.sh(["capsnet", *entry, "--print-config"], env=env)

    def help_check(self, tokens: list[str], key: tuple[str, ...], env: dict[str, str]) -> None:
        for tok in tokens[1:]:
            if FILE_ARG.match(tok) and not (self.root / tok).is_file():
                raise AssertionError(f"`{shlex.join(tokens)}`: {tok} does not exist")
        if key[0] == "make":
            listing = self.sh(["make", "--no-print-directory", "-C", str(REPO), "help"], env=env)
            targets = {line.split()[0] for line in listing.splitlines() if line.strip()}
            missing = [t for t in tokens[1:] if "=" not in t and t not in targets]
            if missing:
                raise AssertionError(f"`{shlex.join(tokens)}`: no make target {missing}")
            return
        if shutil.which(tokens[0], path=env["PATH"]) is None:
            self.log.append(f"(flags not checked: {tokens[0]} is not installed here)")
            return
        text = re.sub(".\b", "", self.sh(help_argv(tokens), env=env, check=False, timeout=120))
        flags = {t.partition("=")[0] for t in tokens if re.match(r"^--?[A-Za-z]", t)}
        missing = sorted(f for f in flags if f not in text)
        if missing:
            raise AssertionError(
                f"`{shlex.join(tokens)}`: `{shlex.join(help_argv(tokens))}` lists no {missing}"
            )
