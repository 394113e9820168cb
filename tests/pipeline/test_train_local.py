"""The worker loop without Ray: outputs, reproducibility, resume, non-finite loss, DDP maths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capscore import CapsNet, CapsNetConfig
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from pipeline.train.loop import NonFiniteLossError, run_dir_for
from pipeline.train.trainer import train


def metrics_of(cfg):
    return [json.loads(l) for l in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]


def test_local_run_writes_every_output(tiny_shards, tiny_config, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path)
    summary = train(cfg, local=True)
    run_dir = run_dir_for(cfg)
    rows = metrics_of(cfg)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["test_samples"] == 80 for r in rows)  # every test sample, exactly once
    assert rows[0]["steps"] == 320 // 32
    for key in (
        "train_margin",
        "train_reconstruction",
        "test_accuracy",
        "lr",
        "images_per_s",
        "epoch_time_s",
        "test_margin",
        "test_reconstruction",
    ):
        assert key in rows[-1]
    assert rows[-1]["lr"] < cfg.train.lr  # exponential decay applied per step
    assert (run_dir / "reconstructions.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(resolve_checkpoint(run_dir, "last"))  # weights_only=True inside
    assert ckpt["next_epoch"] == 2 and ckpt["run_config"]["run"]["name"] == "tiny"
    assert isinstance(model_from_checkpoint(ckpt), CapsNet)
    assert resolve_checkpoint(run_dir / "best").is_file()
    # one copy per kept checkpoint: best and last are names in checkpoints.json, not copies
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [
        "checkpoint_epoch-0001",
        "checkpoint_epoch-0002",
    ]
    assert not (run_dir / "checkpoints").exists()
    assert summary.epochs == 2 and summary.best_test_accuracy == max(
        r["test_accuracy"] for r in rows
    )
    assert "best test accuracy" in summary.line()


def test_learns_above_chance(tiny_shards, tiny_config, tmp_path):
    # +-2 px shifts are harsh on 12x12 images, and the tiny net needs a larger W init to leave
    # squash's flat region near zero quickly; both are test-size choices, not defaults
    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        "train.epochs=10",
        "train.lr=1e-2",
        "data.augment=false",
        "model.weight_init_std=0.5",
    )
    rows = (train(cfg, local=True), metrics_of(cfg))[1]
    assert rows[-1]["test_accuracy"] > 0.5  # chance is 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_same_seed_same_run_and_resume_matches_uninterrupted(tiny_shards, tiny_config, tmp_path):
    full = tiny_config(tiny_shards, tmp_path / "a")
    train(full, local=True)
    again = tiny_config(tiny_shards, tmp_path / "b")
    train(again, local=True)
    assert [r["train_loss"] for r in metrics_of(full)] == [
        r["train_loss"] for r in metrics_of(again)
    ]
    # stop after one epoch, then rerun the same command with the full epoch count
    part = tiny_config(tiny_shards, tmp_path / "c", "train.epochs=1")
    train(part, local=True)
    resumed = tiny_config(tiny_shards, tmp_path / "c")
    train(resumed, local=True)
    assert [r["epoch"] for r in metrics_of(resumed)] == [1, 2]
    w_full = load_checkpoint(resolve_checkpoint(run_dir_for(full), "last"))["model"]
    w_resumed = load_checkpoint(resolve_checkpoint(run_dir_for(resumed), "last"))["model"]
    for name in w_full:
        torch.testing.assert_close(w_resumed[name], w_full[name], msg=name)


def test_finished_run_is_not_retrained(tiny_shards, tiny_config, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1")
    train(cfg, local=True)
    before = (run_dir_for(cfg) / "metrics.jsonl").read_text()
    summary = train(cfg, local=True)
    assert (run_dir_for(cfg) / "metrics.jsonl").read_text() == before
    assert summary.epochs == 1


def test_resume_from_path(tiny_shards, tiny_config, tmp_path):
    first = tiny_config(tiny_shards, tmp_path / "a", "train.epochs=1")
    train(first, local=True)
    ckpt = resolve_checkpoint(run_dir_for(first), "last")
    second = tiny_config(tiny_shards, tmp_path / "b", f"run.resume_from={ckpt}")
    train(second, local=True)
    assert [r["epoch"] for r in metrics_of(second)] == [2]


def test_cnn_trains_through_the_same_loop(tiny_shards, tiny_config, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1", "model.type=cnn")
    train(cfg, local=True)
    row = metrics_of(cfg)[0]
    assert "train_cross_entropy" in row and row["test_samples"] == 80


def test_non_finite_loss_names_step_and_part(tiny_shards, tiny_config, tmp_path, monkeypatch):
    original = CapsNet.loss
    calls = {"n": 0}

    def poisoned(self, out, images, targets, parts=None):
        loss = original(self, out, images, targets, parts)
        calls["n"] += 1
        if calls["n"] == 5:  # global step 4, 0-based
            loss.parts["reconstruction"] = loss.parts["reconstruction"] * float("nan")
            loss.total = sum(loss.parts.values())
        return loss

    monkeypatch.setattr(CapsNet, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*'reconstruction'"):
        train(tiny_config(tiny_shards, tmp_path), local=True)


def _ddp_step(rank: int, world: int, port: int, images, targets, state, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = CapsNet(CapsNetConfig.tiny())
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    shard = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    x, y = images[shard], targets[shard]
    loss = model.loss(ddp(x, y), x, y)
    loss.total.backward()
    opt.step()
    if rank == 0:
        # numpy, not tensors: torch would share memory with a process that is about to exit
        out_q.put({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    dist.destroy_process_group()


@pytest.mark.slow  # spawns gloo processes
@pytest.mark.parametrize("world", [1, 2])
def test_ddp_two_half_batches_equal_one_full_batch(world):
    torch.manual_seed(0)
    images, targets = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    state = CapsNet(CapsNetConfig.tiny()).state_dict()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000 + world
    procs = [
        ctx.Process(target=_ddp_step, args=(r, world, port, images, targets, state, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    result = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # reference: one plain process, the full batch
    model = CapsNet(CapsNetConfig.tiny())
    model.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(model(images, targets), images, targets).total.backward()
    opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.from_numpy(result[name]), value, rtol=1e-5, atol=1e-6, msg=name
        )


def test_checkpoint_staging_folders_are_removed(tiny_shards, tiny_config, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    train(tiny_config(tiny_shards, tmp_path / "runs"), local=True)
    assert not list(scratch.glob("capsnet-ckpt-*")), "per-epoch staging checkpoints leaked"


def test_skipped_samples_are_reported(tiny_shards, tiny_config, tmp_path):
    """A run over a corrupt shard used to report 0 skipped (the loop read a misspelt stat)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: 3 * 512 + 100])  # cut inside the second sample
    cfg = tiny_config(shards, tmp_path / "runs", "train.epochs=1")
    train(cfg, local=True)
    row = metrics_of(cfg)[0]
    assert row["skipped_samples"] > 0


# --- resume rules ------------------------------------------------------------------------------


def test_rerun_with_changed_hyperparameters_is_refused_with_the_diff(
    tiny_shards, tiny_config, tmp_path
):
    """It used to resume silently with the old optimizer state and relabel the weights."""
    from pipeline.config import ConfigError

    train(tiny_config(tiny_shards, tmp_path, "train.epochs=1"), local=True)
    changed = tiny_config(tiny_shards, tmp_path, "train.lr=1e-5", "model.routing.iterations=1")
    with pytest.raises(ConfigError) as err:
        train(changed, local=True)
    text = str(err.value)
    assert "train.lr: 0.001 -> 1e-05" in text and "model.routing.iterations" in text
    assert "--new-run" in text and "--allow-config-change" in text
    assert [r["epoch"] for r in metrics_of(changed)] == [1]  # nothing trained


def test_allowed_config_change_resumes_with_the_new_lr(tiny_shards, tiny_config, tmp_path):
    train(tiny_config(tiny_shards, tmp_path, "train.epochs=1"), local=True)
    changed = tiny_config(tiny_shards, tmp_path, "train.lr=1e-5")
    train(changed, local=True, allow_config_change=True)
    rows = metrics_of(changed)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["lr"] < 1e-5  # the new lr, decayed from where the schedule was
    import yaml

    saved = yaml.safe_load((run_dir_for(changed) / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(1e-5)  # the run's config now says so


def test_safe_keys_resume_without_asking(tiny_shards, tiny_config, tmp_path):
    train(tiny_config(tiny_shards, tmp_path, "train.epochs=1"), local=True)
    longer = tiny_config(
        tiny_shards, tmp_path, "train.epochs=2", "train.log_every=1", "run.max_failures=5"
    )
    train(longer, local=True)
    assert [r["epoch"] for r in metrics_of(longer)] == [1, 2]


def test_resume_from_on_a_run_with_checkpoints_is_an_error(tiny_shards, tiny_config, tmp_path):
    from pipeline.config import ConfigError

    first = tiny_config(tiny_shards, tmp_path / "a", "train.epochs=1")
    train(first, local=True)
    other = resolve_checkpoint(run_dir_for(first), "last")
    train(tiny_config(tiny_shards, tmp_path / "b", "train.epochs=1"), local=True)
    again = tiny_config(tiny_shards, tmp_path / "b", f"run.resume_from={other}")
    with pytest.raises(ConfigError, match="already has checkpoints.*--resume-from"):
        train(again, local=True)


def test_finished_run_says_how_to_extend_it(tiny_shards, tiny_config, tmp_path, capsys):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1")
    train(cfg, local=True)
    capsys.readouterr()
    train(cfg, local=True)
    out = capsys.readouterr().out
    assert "already finished" in out and "train.epochs=N" in out


def test_kept_checkpoints_follow_the_keep_rule(tiny_shards, tiny_config, tmp_path):
    """One copy per kept checkpoint: the best by accuracy plus the latest, every k epochs."""
    from pipeline.train.checkpoint import CheckpointIndex

    cfg = tiny_config(
        tiny_shards, tmp_path, "train.epochs=5", "run.keep_checkpoints=1", "run.checkpoint_every=2"
    )
    train(cfg, local=True)
    run_dir = run_dir_for(cfg)
    index = CheckpointIndex.load(run_dir)
    rows = {r["epoch"]: r["test_accuracy"] for r in metrics_of(cfg)}
    saved = [2, 4, 5]  # every 2 epochs, and the last
    best = max(saved, key=lambda e: (rows[e], e))
    on_disk = sorted(p.name for p in run_dir.glob("checkpoint_*"))
    assert on_disk == sorted(set(index.entries)) and index.last == "checkpoint_epoch-0005"
    assert index.best == f"checkpoint_epoch-{best:04d}"
    assert len(on_disk) == len({best, 5})


def test_truncated_newest_checkpoint_falls_back_to_an_older_one(
    tiny_shards, tiny_config, tmp_path, capsys
):
    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=2", "run.keep_checkpoints=2")
    train(cfg, local=True)
    newest = run_dir_for(cfg) / "checkpoint_epoch-0002" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    longer = tiny_config(tiny_shards, tmp_path, "train.epochs=3", "run.keep_checkpoints=2")
    train(longer, local=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "checkpoint_epoch-0002" in out
    assert [r["epoch"] for r in metrics_of(longer)] == [1, 2, 3]  # epoch 2 trained again


def test_partial_per_epoch_evaluation_is_an_error_unless_allowed(
    tiny_shards, tiny_config, tmp_path, capsys
):
    """It used to report the accuracy of whatever eval samples were readable as the epoch's."""
    import shutil

    from pipeline.evaluate import IncompleteEvaluationError

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("test-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: 3 * 512 + 100])
    cfg = tiny_config(shards, tmp_path / "a", "train.epochs=1")
    with pytest.raises(IncompleteEvaluationError, match="test"):
        train(cfg, local=True)
    allowed = tiny_config(shards, tmp_path / "b", "train.epochs=1", "data.allow_partial_eval=true")
    train(allowed, local=True)
    row = metrics_of(allowed)[0]
    assert row["test_samples"] < row["test_samples_expected"] == 80
    assert "warning: epoch 1" in capsys.readouterr().out


def test_a_kill_mid_checkpoint_leaves_nothing_behind_after_the_rerun(
    tiny_shards, tiny_config, tmp_path, capsys
):
    """A kill during the checkpoint write used to leave checkpoint.pt.tmp and staging folders
    (~100 MB each for the paper model) for good."""
    import tempfile

    from pipeline.train.context import staging_prefix

    cfg = tiny_config(tiny_shards, tmp_path, "train.epochs=1")
    train(cfg, local=True)
    run_dir = run_dir_for(cfg)
    half = run_dir / "checkpoint_epoch-0002" / "checkpoint.pt.tmp"
    half.parent.mkdir()
    half.write_bytes(b"half a checkpoint")
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(run_dir)))
    (staging / "checkpoint_epoch-0002").mkdir()
    train(tiny_config(tiny_shards, tmp_path, "train.epochs=2"), local=True)
    assert not half.exists() and not staging.exists()
    assert "left by an earlier attempt" in capsys.readouterr().out
    assert [r["epoch"] for r in metrics_of(cfg)] == [1, 2]


def test_missing_eval_split_fails_before_training(tiny_shards, tiny_config, tmp_path):
    """It used to fail only after a whole training epoch, advising fewer ranks."""
    from pipeline.data import DataError

    cfg = tiny_config(tiny_shards, tmp_path, "data.eval_split=val")
    with pytest.raises(DataError, match=r"data\.eval_split.*'val'.*available: test, train"):
        train(cfg, local=True)
    assert not run_dir_for(cfg).exists()  # nothing started
