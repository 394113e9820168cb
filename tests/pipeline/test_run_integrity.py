"""Run integrity without servers (issue 19): the keep rule against Ray's own, resume on I/O
errors, metrics.jsonl with a torn last line, fatal.json, temp folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.train.checkpoint import CheckpointIndex, checkpoint_name

NAN = math.nan

# score sequences (one test accuracy per epoch) x keep: ties, NaN, falls and rises
SEQUENCES = [
    [0.9, 0.9, 0.8],
    [0.9, 0.9, 0.9, 0.9],
    [0.5, 0.7, 0.7, 0.6, 0.7],
    [0.8, 0.7, 0.6, 0.5],
    [0.1, 0.2, 0.3, 0.4],
    [0.9, NAN, 0.9, NAN, 0.2],
    [NAN, NAN, 0.1],
    [0.3, 0.3, 0.5, 0.5, 0.3, 0.5],
]


def _ray_kept(accuracies: list[float], keep: int, root: Path) -> tuple[set[str], str]:
    """The folders Ray Train's own checkpoint manager keeps (and its best) for these scores,
    run without starting Ray: CheckpointConfig(num_to_keep=keep, score test_accuracy max)."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    config = CheckpointConfig(
        num_to_keep=keep, checkpoint_score_attribute="test_accuracy", checkpoint_score_order="max"
    )
    manager = _CheckpointManager(config)
    for epoch, accuracy in enumerate(accuracies, start=1):
        folder = root / checkpoint_name(epoch)
        folder.mkdir(parents=True)  # the manager deletes the ones it drops
        manager.register_checkpoint(
            _TrainingResult(
                checkpoint=Checkpoint.from_directory(str(folder)),
                metrics={"test_accuracy": accuracy, "epoch": epoch},
            )
        )
    kept = {p.name for p in root.iterdir()}
    best = Path(manager.best_checkpoint_result.checkpoint.path).name
    return kept, best


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("accuracies", SEQUENCES, ids=str)
def test_keep_rule_matches_rays(accuracies: list[float], keep: int, tmp_path: Path) -> None:
    index = CheckpointIndex(entries={})
    for epoch, accuracy in enumerate(accuracies, start=1):
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=keep)
    kept, best = _ray_kept(accuracies, keep, tmp_path)
    assert set(index.entries) == kept
    assert index.best == best
    assert index.last == checkpoint_name(len(accuracies))


def test_keep_one_tie_names_the_newer_best() -> None:
    """The issue's case: .9, .9, .8 with keep=1 — Ray keeps epoch 2 (newer wins a tie) and 3."""
    index = CheckpointIndex(entries={})
    for epoch, accuracy in enumerate([0.9, 0.9, 0.8], start=1):
        index.add(checkpoint_name(epoch), epoch, accuracy, keep=1)
    assert index.best == checkpoint_name(2)
    assert set(index.entries) == {checkpoint_name(2), checkpoint_name(3)}

