"""Per-epoch fixed cost of the real loop (issue 13): (wall of 6 epochs - wall of 1) / 5 with the
paper config, 1 step per epoch, batch 8, and the model's compute (CapsNet.forward,
Tensor.backward, Adam.step, summed in-process) subtracted, so a loaded machine still shows
the fixed part. Extra arguments are passed on as `--set` overrides.

    .venv/bin/python bench/epoch_cost.py SHARD_DIR [--set run.checkpoint_every=5 ...]

SHARD_DIR: e.g. 60,000 synthetic train samples and a 64-image test split.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_train() -> None:
    """Child: run `capsnet ARGS` here, print wall and the time in model compute."""
    import torch

    import capscore.models as models
    from pipeline.cli import main

    spent = [0.0]

    def wrap(obj, name):
        f = getattr(obj, name)

        @functools.wraps(f)
        def w(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(obj, name, w)

    wrap(models.CapsNet, "forward")
    wrap(torch.Tensor, "backward")
    wrap(torch.optim.Adam, "step")
    sys.argv = ["capsnet", *sys.argv[2:]]
    t = time.perf_counter()
    main()
    print("RESULT", json.dumps({"wall": time.perf_counter() - t, "compute": spent[0]}), flush=True)


def run(shards: str, work: str, epochs: int, extra: list[str]) -> dict:
    sets = [
        f"data.shards={shards}",
        "train.max_steps_per_epoch=1",
        "train.batch_size=8",
        f"train.epochs={epochs}",
        f"run.storage_path={work}",
        f"run.name=e{epochs}",
        *extra,
    ]
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "train",
        "--config",
        str(ROOT / "configs" / "mnist.yaml"),
        "--local",
    ]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=work).stdout
    return json.loads(out.split("RESULT ")[1])


def main() -> None:
    shards, extra = sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]
    for _ in range(int(os.environ.get("REPS", "2"))):
        work = tempfile.mkdtemp(prefix="epoch-cost-")
        a, b = run(shards, work, 1, extra), run(shards, work, 6, extra)
        shutil.rmtree(work, ignore_errors=True)
        per = (b["wall"] - a["wall"]) / 5
        fixed = (b["wall"] - b["compute"] - (a["wall"] - a["compute"])) / 5
        print(
            f"wall1 {a['wall']:.2f} wall6 {b['wall']:.2f}: per-epoch {per:.2f} s, of which model "
            f"compute {per - fixed:.2f} s, fixed cost {fixed:.2f} s; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    timed_train() if sys.argv[1:2] == ["--child"] else main()
