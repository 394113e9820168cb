"""pipeline.evaluate: partial evaluations say so (and fail unless allowed), shards that do not
fit the checkpoint are refused before reading, out-of-range labels are a clear error, and the
multi-hot metric is per sample (fast tier: tiny models, no Ray)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from capscore import BaselineCNNConfig, CapsNetConfig, build_model
from pipeline.data import DataError, DatasetInfo, SplitInfo, open_loader
from pipeline.data.batch import Batch
from pipeline.evaluate import (
    EvalResult,
    IncompatibleDataError,
    IncompleteEvaluationError,
    check_compatible,
    correct_predictions,
    evaluate,
    format_result,
    require_complete,
)

SAMPLE_BYTES = 4 * 512  # a 12x12 sample in a shard: header + image block + header + label block


def result(total: int, expected: int = 100, correct: int | None = None) -> EvalResult:
    return EvalResult(
        correct=total if correct is None else correct,
        total=total,
        loss_sums={"margin": 0.5 * total},
        samples_skipped=expected - total,
        expected=expected,
    )


def info(shape=(1, 28, 28), classes=10, kind="index") -> DatasetInfo:
    return DatasetInfo(
        name="x",
        image_shape=shape,
        num_classes=classes,
        label_kind=kind,
        splits={"test": SplitInfo(0, ())},
        base_url="/data/x",
    )


# --- item 7: an accuracy says over how many samples; partial is an error unless allowed ----


def test_complete_result_needs_nothing():
    r = result(100)
    assert r.complete and r.unreadable == 0
    assert require_complete(r, "test") is None
    assert "over 100 of 100 samples" in format_result(r, "t")


def test_partial_result_is_an_error_naming_counts_and_the_way_on():
    r = result(51)
    assert not r.complete and r.unreadable == 49
    with pytest.raises(IncompleteEvaluationError) as caught:
        require_complete(r, "test")
    message = str(caught.value)
    assert isinstance(caught.value, DataError) and "\n" not in message
    assert "read 51 of 100 samples (49 unreadable)" in message
    assert "--on-error skip --allow-partial" in message and "fix the shards" in message
    with pytest.raises(IncompleteEvaluationError, match="data.on_error=skip"):
        require_complete(r, "test", remedy="data.on_error=skip")


def test_allowed_partial_result_is_a_warning_and_the_report_says_over_what():
    r = EvalResult(correct=9663, total=9950, loss_sums={}, samples_skipped=50, expected=10_000)
    warning = require_complete(r, "test", allow_partial=True)
    assert warning is not None and "9,950 of 10,000 samples (50 unreadable)" in warning
    assert "accuracy 0.9712  error 2.88%  over 9,950 of 10,000 samples (50 unreadable)" in (
        format_result(r, "t")
    )


def test_nothing_read_is_an_error_even_when_partial_is_allowed():
    with pytest.raises(IncompleteEvaluationError, match="none of its 100 samples"):
        require_complete(result(0), "test", allow_partial=True)


def test_evaluate_counts_over_the_split_of_dataset_json(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    path = shards / "test-000000.tar"
    path.write_bytes(path.read_bytes()[: 10 * SAMPLE_BYTES + 700])  # 10 samples, then cut
    model = build_model(CapsNetConfig.tiny())
    loader = open_loader(shards, "test", batch_size=32, training=False)
    r = evaluate(model, loader, torch.device("cpu"))
    assert (r.total, r.expected, r.complete) == (40, 80, False)  # 10 of 50 + all 30
    assert r.samples_skipped == r.unreadable == 40
    with pytest.raises(IncompleteEvaluationError, match="read 40 of 80 samples"):
        require_complete(r, "test")


class FakeLoader:
    """What evaluate() reads of a ShardLoader: batches, info, split and stats."""

    def __init__(self, batches, kind="index", expected=4):
        self.batches = [Batch(*b) for b in batches]
        self.info = SimpleNamespace(
            label_kind=kind, split=lambda name: SimpleNamespace(num_samples=expected)
        )
        self.split = "test"
        self.stats = SimpleNamespace(samples_skipped=expected - sum(len(b) for b in self.batches))

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("kind, names", [("index", {"cross_entropy"}), ("multi-hot", {"bce"})])
def test_a_rank_without_batches_packs_the_same_loss_parts(kind, names):
    # Under DDP every rank all_reduces one vector of [correct, total, skipped, *parts]: a rank
    # whose shards were all unreadable must still hold every part name, or the ranks mismatch.
    model = build_model(BaselineCNNConfig.tiny())
    r = evaluate(model, FakeLoader([], kind=kind), torch.device("cpu"))
    assert set(r.loss_sums) == names and r.total == 0 and r.expected == 4
    capsnet = evaluate(build_model(CapsNetConfig.tiny()), FakeLoader([]), torch.device("cpu"))
    assert set(capsnet.loss_sums) == {"margin", "reconstruction"}


# --- item 8: shards that do not fit the checkpoint ----------------------------------------


@pytest.mark.parametrize("config_type", [CapsNetConfig, BaselineCNNConfig])
def test_other_shapes_or_classes_are_refused_naming_both_sides(config_type):
    config = config_type()  # 1x28x28, 10 classes
    check_compatible(config, info())
    with pytest.raises(IncompatibleDataError) as caught:
        check_compatible(config, info((3, 32, 32), 5), shards="shards/x")
    assert str(caught.value) == (
        "checkpoint expects 1x28x28 images and 10 classes; shards/x has 3x32x32 and 5"
    )
    with pytest.raises(IncompatibleDataError, match="10 classes; /data/x has 1x28x28 and 5$"):
        check_compatible(config, info(classes=5))
    with pytest.raises(IncompatibleDataError, match="has 1x28x36 and 10$"):
        check_compatible(config, info((1, 28, 36)))


def test_label_kinds():
    config = CapsNetConfig()
    multi = info(kind="multi-hot")
    with pytest.raises(IncompatibleDataError, match="trained on single-label data.*multi-hot"):
        check_compatible(config, multi, trained_label_kind="index")
    check_compatible(config, multi, trained_label_kind="multi-hot")  # MultiMNIST on MultiMNIST
    check_compatible(config, multi)  # training data unknown: evaluated as multi-hot
    check_compatible(config, info(), trained_label_kind="multi-hot")  # top class: well-defined


def test_targets_outside_the_models_classes_are_a_clear_error():
    model = build_model(CapsNetConfig.tiny())  # 12x12, 10 classes
    images = torch.rand(4, 1, 12, 12)
    for labels in ([0, 1, 10, 3], [0, -1, 2, 3]):
        loader = FakeLoader([(images, torch.tensor(labels))])
        with pytest.raises(IncompatibleDataError, match="outside the model's 10 classes"):
            evaluate(model, loader, torch.device("cpu"))
    loader = FakeLoader([(images, torch.zeros(4, 5))], kind="multi-hot")
    with pytest.raises(IncompatibleDataError, match=r"shape \(4, 5\); the model has 10"):
        evaluate(model, loader, torch.device("cpu"))
    loader = FakeLoader([(torch.rand(4, 3, 12, 12), torch.tensor([0, 1, 2, 3]))])
    with pytest.raises(IncompatibleDataError, match="expects 1x12x12 images; .* gave 3x12x12"):
        evaluate(model, loader, torch.device("cpu"))


# --- the multi-hot metric ------------------------------------------------------------------


def test_multi_hot_correct_is_per_sample_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.9, 0.2, 0.0], [0.9, 0.1, 0.8, 0.0]])
    targets = torch.tensor([[1.0, 1, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    # sample 1 has one class: its top-1 is right, whatever the other samples' k
    assert correct_predictions(scores, targets).tolist() == [True, True, False]
    assert correct_predictions(scores, torch.tensor([0, 1, 2])).tolist() == [True, True, False]


def test_multi_hot_result_has_no_confusion_matrix(tiny_shards):
    model = build_model(CapsNetConfig.tiny())
    images = torch.rand(4, 1, 12, 12)
    hot = torch.zeros(4, 10)
    hot[:, :2] = 1
    r = evaluate(model, FakeLoader([(images, hot)], kind="multi-hot"), torch.device("cpu"))
    assert r.confusion is None and r.complete and r.label_kind == "multi-hot"
    text = format_result(r, "t")
    assert "multi-label" in text and "confusion" not in text
