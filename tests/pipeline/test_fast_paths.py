"""The training step: no host sync per step, and the fast paths (bf16 autocast, torch.compile)
predict what fp32 predicts on a fixed batch (issue 13)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from capscore import CapsNet, CapsNetConfig
from pipeline.config import TrainSection
from pipeline.data import Batch
from pipeline.train.checkpoint import TrainState
from pipeline.train.loop import TrainStep
from pipeline.train.trainer import train
from tests.pipeline.conftest import make_tiny_config

OURS = tuple(str(Path(__file__).resolve().parents[2] / d) for d in ("pipeline", "capscore"))
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class HostSyncs:
    """Counts (or refuses) Tensor -> Python conversions made by our own code (pipeline/,
    capscore/): on a GPU each one waits for the device. torch's internals are not counted
    (on CPU, Adam reads its CPU step counter with .item(); on CUDA that is no device sync
    either; the gpu-marked test below checks everything, torch included)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, refuse: bool):
        self.calls: list[str] = []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original, refuse))

    def _wrap(self, name, original, refuse):
        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(OURS):
                where = f"{Path(caller.co_filename).name}:{caller.co_name} Tensor.{name}"
                if refuse:
                    raise AssertionError(f"host sync in the step: {where}")
                self.calls.append(where)
            return original(tensor, *args, **kwargs)

        return wrapper


def _state(precision: str = "fp32", compile: bool = False, seed: int = 0, lr: float = 1e-3):
    torch.manual_seed(seed)
    model = CapsNet(CapsNetConfig.tiny())
    section = TrainSection(precision=precision, compile=compile, lr=lr)
    device = torch.device("cpu")
    state = TrainState.create(model, section, device)
    return state, TrainStep(state, section, device)


TEMPLATES = torch.rand(10, 1, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.7


def _loader_batch(n: int = 16, seed: int = 1) -> Batch:
    """A batch as the loader hands it over (uint8 pixels, pending shifts) of a learnable
    task: each class is a fixed random pattern, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randint(0, 64, (n, 1, 12, 12), generator=g)
    images = (TEMPLATES[labels] * 191 + noise).to(torch.uint8)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    return Batch(images, labels, shifts=shifts, max_shift=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_makes_no_host_sync(monkeypatch, precision):
    state, step = _state(precision)
    HostSyncs(monkeypatch, refuse=True)
    losses = [step(_loader_batch(seed=s)) for s in range(3)]  # finishing the batch included
    monkeypatch.undo()
    assert all(loss.shape == (3,) and torch.isfinite(loss).all() for loss in losses)
    assert step.names == ["total", "margin", "reconstruction"]


def test_host_syncs_per_epoch_do_not_grow_with_steps(tiny_shards, tmp_path, monkeypatch):
    """The whole loop (train pass, eval, metrics): the same syncs for 2 steps as for 8, so
    none is per step (progress lines and NaN checks come every log_every steps)."""
    counts = []
    for steps in (2, 8):
        cfg = make_tiny_config(
            tiny_shards,
            tmp_path / str(steps),
            "train.epochs=1",
            "train.log_every=100",
            f"train.max_steps_per_epoch={steps}",
            "train.batch_size=8",
            "run.report_to=[]",
        )
        syncs = HostSyncs(monkeypatch, refuse=False)
        train(cfg, local=True)
        monkeypatch.undo()
        counts.append(sorted(syncs.calls))
    assert counts[0] == counts[1]


def _predict(state: TrainState, images: torch.Tensor, precision: str) -> CapsNet:
    from pipeline.torch_utils import autocast_for

    model = state.model.eval()
    with torch.no_grad(), autocast_for(precision, torch.device("cpu")):
        return model(images)


def _trained_state(steps=40):
    """A tiny CapsNet trained a little in fp32 (so its predictions are not ties)."""
    state, step = _state(lr=1e-2)
    for s in range(steps):
        step(_loader_batch(n=32, seed=s))
    return state


def test_bf16_autocast_predicts_what_fp32_predicts():
    """Tolerance: capsule lengths within 0.01 (bf16 has 8 mantissa bits; squash, routing
    logits/softmax and the losses stay fp32 in capscore; 0.002 measured), hence the same
    class for every sample whose fp32 margin between its two longest capsules exceeds 0.02."""
    state = _trained_state()
    images = _loader_batch(n=64, seed=99).to("cpu").images
    fp32, bf16 = _predict(state, images, "fp32"), _predict(state, images, "bf16")
    assert bf16.lengths.dtype in (torch.float32, torch.bfloat16)
    torch.testing.assert_close(bf16.lengths.float(), fp32.lengths, atol=1e-2, rtol=0)
    top2 = fp32.lengths.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.02
    assert clear.sum() >= 16
    assert torch.equal(bf16.scores.argmax(1)[clear], fp32.scores.argmax(1)[clear])


def test_bf16_training_step_tracks_fp32():
    """Ten steps in bf16 autocast from the same start: losses within 5 % of fp32's."""
    runs = []
    for precision in ("fp32", "bf16"):
        state, step = _state(precision)
        runs.append(torch.stack([step(_loader_batch(n=32, seed=s))[0] for s in range(10)]))
    torch.testing.assert_close(runs[1], runs[0], rtol=5e-2, atol=0)


def _inductor_available() -> str | None:
    """Why torch.compile cannot run here, or None."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(2))
    except Exception as err:  # no C++ compiler, unsupported platform...
        return f"torch.compile (inductor) fails on this machine: {type(err).__name__}: {err}"
    return None


@pytest.mark.slow
def test_compiled_step_matches_eager_step():
    """torch.compile of forward + loss: after 3 identical steps from the same start, losses and
    weights within 1e-4 of eager (fusion reorders float sums; nothing else may differ)."""
    why = _inductor_available()
    if why:
        pytest.skip(why)
    results = []
    for compile in (False, True):
        state, step = _state(compile=compile)
        losses = torch.stack([step(_loader_batch(n=16, seed=s)) for s in range(3)])
        results.append((losses, [p.detach().clone() for p in state.model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for compiled, eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision, compile", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_cuda_step_makes_no_device_sync(precision, compile):
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig.mnist()).cuda()
    section = TrainSection(precision=precision, compile=compile)
    device = torch.device("cuda")
    state = TrainState.create(model, section, device)
    step = TrainStep(state, section, device)
    g = torch.Generator().manual_seed(0)

    def batch():
        images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
        shifts = torch.randint(-2, 3, (64, 2), generator=g)
        labels = torch.randint(0, 10, (64,), generator=g)
        return Batch(images, labels, shifts=shifts, max_shift=2).pin_memory()

    for _ in range(3):  # warm-up: compilation, cuDNN autotuning, Adam's lazy state
        step(batch())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(batch()) for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_bf16_predicts_what_fp32_predicts(compile):
    """On the device: bf16 autocast (compiled or not) against fp32, with the CPU test's
    tolerances (lengths within 0.01, the same class where fp32's top-two margin > 0.02)."""
    model = _trained_state().model.cuda().eval()
    images = _loader_batch(n=64, seed=99).to("cuda").images
    with torch.no_grad():
        fp32 = model(images)
        fast = torch.compile(model) if compile else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = fast(images)
    torch.testing.assert_close(bf16.lengths.float(), fp32.lengths, atol=1e-2, rtol=0)
    top2 = fp32.lengths.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.02
    assert clear.sum() >= 16
    assert torch.equal(bf16.scores.argmax(1)[clear], fp32.scores.argmax(1)[clear])
