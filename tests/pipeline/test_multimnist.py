"""MultiMNIST end to end: parts in the loader, per-object reconstruction loss, two-digit
accuracy, and a short training run that learns (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capscore import CapsNet, CapsNetConfig, build_model
from capscore.losses import reconstruction_loss
from pipeline.data import open_loader
from pipeline.data.augment import shift_images
from pipeline.evaluate import align_predictions, correct_predictions, evaluate
from pipeline.train.loop import run_dir_for
from pipeline.train.trainer import train


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t * 255).round().to(torch.uint8).numpy().astype(np.int64)


@pytest.mark.parametrize("training", [False, True])
def test_loader_yields_each_digit_and_its_class(multimnist_shards, training):
    loader = open_loader(
        multimnist_shards, "train" if training else "test", batch_size=50, training=training
    )
    batch = next(iter(loader)).to("cpu")  # finished: shifted, float in [0, 1]
    assert batch.images.shape == (50, 1, 36, 36) and batch.parts.shape == (50, 2, 1, 36, 36)
    assert batch.part_classes.shape == (50, 2) and batch.part_classes.dtype == torch.int64
    # The multi-hot label is exactly the two part classes ...
    hot = torch.zeros(50, 10).scatter_(1, batch.part_classes, 1.0)
    assert torch.equal(hot, batch.labels)
    # ... and the input is the two parts overlaid, also after the training shift (the same
    # offset moves the input and both of its targets).
    merged = np.minimum(_u8(batch.parts[:, 0]) + _u8(batch.parts[:, 1]), 255)
    np.testing.assert_array_equal(merged, _u8(batch.images))


def test_training_shift_moves_parts_with_the_input(multimnist_shards):
    kw = dict(batch_size=40, shuffle_buffer=1, training=True)
    shifted = next(iter(open_loader(multimnist_shards, "train", augment=True, **kw))).to("cpu")
    plain = next(iter(open_loader(multimnist_shards, "train", augment=False, **kw))).to("cpu")
    assert torch.equal(shifted.part_classes, plain.part_classes)  # same samples, same order
    assert not torch.equal(shifted.parts, plain.parts)
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for i in range(10):  # the offset that moved sample i's input moved both its parts
        tensors = [(shifted.images[i], plain.images[i])] + [
            (shifted.parts[i, k], plain.parts[i, k]) for k in range(2)
        ]
        fits = [
            {
                (dy, dx)
                for dy, dx in offsets
                if np.array_equal(
                    shift_images(_u8(b)[None], np.array([dy]), np.array([dx]), 2)[0], _u8(a)
                )
            }
            for a, b in tensors
        ]
        assert fits[0] and fits[0] & fits[1] & fits[2]


def test_bad_part_metadata_is_a_counted_skip(multimnist_shards, tmp_path):
    import shutil
    import tarfile

    copy = tmp_path / "mm"
    shutil.copytree(multimnist_shards, copy)
    info = json.loads((copy / "dataset.json").read_text())
    shard = copy / info["splits"]["test"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_json = next(m.name for m, _ in members if m.name.endswith(".json"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == first_json:
                data = b'{"classes": [1]}'  # one class for two part images
                member.size = len(data)
            import io

            tar.addfile(member, io.BytesIO(data))
    loader = open_loader(copy, "test", batch_size=50, training=False, verify_checksums=False)
    total = sum(len(b) for b in loader)
    assert total == info["splits"]["test"]["num_samples"] - 1
    assert loader.stats.skipped_bad_label == 1


def test_per_part_reconstruction_is_each_capsule_alone():
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig.tiny(image_size=16)).eval()
    images = torch.rand(3, 1, 16, 16)
    classes = torch.tensor([[1, 4], [0, 9], [7, 2]])
    out = model(images, part_classes=classes)
    assert out.reconstructions.shape == (3, 2, 1, 16, 16)
    for k in range(2):
        alone = model(images, classes[:, k]).reconstructions  # one-hot mask of that class
        torch.testing.assert_close(out.reconstructions[:, k], alone)


def test_multi_part_reconstruction_loss_is_the_sum_over_parts():
    # Hand-computed: sample 0 errs by 0.5 on 2 pixels of part 0 and 1.0 on 1 pixel of part 1;
    # sample 1 is exact. SSE per sample: 0.25*2 + 1 = 1.5 and 0; weighted mean 0.01 * 0.75.
    targets = torch.zeros(2, 2, 1, 2, 2)
    recon = targets.clone()
    recon[0, 0, 0, 0, :] = 0.5
    recon[0, 1, 0, 1, 1] = 1.0
    assert float(reconstruction_loss(recon, targets, weight=0.01)) == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(recon[:, 0], targets)


def test_capsnet_loss_with_parts_uses_the_parts_not_the_input():
    torch.manual_seed(1)
    model = CapsNet(CapsNetConfig.tiny(image_size=16))
    images, parts = torch.rand(2, 1, 16, 16), torch.rand(2, 2, 1, 16, 16)
    classes = torch.tensor([[1, 4], [0, 9]])
    hot = torch.zeros(2, 10).scatter_(1, classes, 1.0)
    out = model(images, hot, part_classes=classes)
    loss = model.loss(out, images, hot, parts)
    expected = 0.0005 * (out.reconstructions - parts).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss.reconstruction, expected)


def test_two_digit_accuracy_needs_both_digits():
    # Scores of 3 samples over 4 classes; labels {0,1}, {2,3}, {1,3}.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.7], [0.1, 0.6, 0.2, 0.9]])
    hot = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]], dtype=torch.float32)
    # sample 0: top-2 {0,1} right; sample 1: top-2 {0,2}, one digit wrong; sample 2: {3,1} right
    assert correct_predictions(scores, hot).tolist() == [True, False, True]


def test_align_predictions_puts_each_true_class_in_its_slot():
    predicted = torch.tensor([[4, 1], [3, 7], [5, 6], [2, 8]])
    true = torch.tensor([[1, 4], [7, 0], [0, 1], [2, 8]])
    # both hit (swapped); one hit (7 to slot 0, the other prediction 3 to slot 1); none hit
    # (predictions in order); both hit in order.
    assert align_predictions(predicted, true).tolist() == [[1, 4], [7, 3], [5, 6], [2, 8]]


def test_evaluate_reports_two_digit_accuracy_and_per_part_reconstruction(multimnist_shards):
    model = build_model(CapsNetConfig.tiny(image_size=36))
    loader = open_loader(multimnist_shards, "test", batch_size=64, training=False)
    r = evaluate(model, loader, torch.device("cpu"))
    assert r.label_kind == "multi-hot" and r.total == r.expected == 200 and r.confusion is None
    assert set(r.loss_sums) == {"margin", "reconstruction"}
    assert all(np.isfinite(v) for v in r.loss_sums.values())


@pytest.mark.slow
def test_short_multimnist_run_learns_above_chance(multimnist_shards, tiny_config, tmp_path):
    # Chance that both of the two longest capsules are right: 1 / C(10, 2) = 2.2 %.
    cfg = tiny_config(
        multimnist_shards,
        tmp_path,
        "model.image_size=36",
        "model.weight_init_std=0.3",
        "train.epochs=6",
        "train.lr=5e-3",
        "data.augment=false",
    )
    train(cfg, local=True)
    rows = [json.loads(l) for l in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_accuracy"] > 0.2, rows[-1]
    assert rows[-1]["train_reconstruction"] < rows[0]["train_reconstruction"]
