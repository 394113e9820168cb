"""`DataConfig`: the run config's `data:` section and the loader's settings, defined once.

The loader reads its settings from this object (`make_loader(data, split, ...)`), so a value
that passes config validation is a value the loader accepts, with one set of defaults.
Fields marked RESUME_SAFE (how data is read, not which data) may change when a run resumes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.data.urls import DEFAULT_TIMEOUT_S
from pipeline.schema import RESUME_SAFE, Bool, Float, Int, Section, Str


class DataConfig(Section):
    shards: Annotated[Str, Field(min_length=1)] = "shards/mnist"
    """Shard folder (or URL) holding dataset.json, as written by `capsnet shards`."""
    train_split: Str = "train"
    """Split to train on."""
    eval_split: Str = "test"
    """Split evaluated exactly after every epoch."""
    loader_workers: Annotated[Int, Field(ge=0), RESUME_SAFE] = 2
    """DataLoader worker processes per training worker; 0 reads in the training process."""
    shuffle_buffer: Annotated[Int, Field(ge=1)] = 2000
    """Samples held in each loader worker's shuffle buffer (shards are pre-shuffled too)."""
    augment: Bool = True
    """Random shifts of up to max_shift px of training images (the paper's only augmentation)."""
    max_shift: Annotated[Int, Field(ge=0)] = 2
    """Largest shift in pixels for `augment`."""
    on_error: Annotated[Literal["skip", "raise"], RESUME_SAFE] = "skip"
    """Corrupt samples/shards: skip and count them, or stop."""
    allow_partial_eval: Annotated[Bool, RESUME_SAFE] = False
    """Report an epoch's test accuracy over the readable part of the eval split (a warning)
    when some of it cannot be read; false: that is an error, naming what was unreadable."""
    verify_checksums: Annotated[Bool, RESUME_SAFE] = False
    """Check every shard's sha256 against dataset.json before training."""
    url_timeout_s: Annotated[Float, Field(gt=0, le=3600), RESUME_SAFE] = DEFAULT_TIMEOUT_S
    """http(s) shards: seconds to wait to connect, for an answer or for the next byte before
    the shard counts as unreadable (a silent server ends a read in about 1-2× this)."""
    pin_memory: Annotated[Bool, RESUME_SAFE] = False
    """Page-locked host batches (faster copies to a GPU)."""
    prefetch_factor: Annotated[Int, Field(ge=1), RESUME_SAFE] = 4
    """Hand-off units (see handoff_samples) each loader worker prepares ahead (with
    loader_workers > 0)."""
    handoff_samples: Annotated[Int, Field(ge=1), RESUME_SAFE] = 2048
    """Samples a loader worker process hands over at once: whole batches, at least one. The
    hand-off between processes costs per object, not per byte, so units of several batches
    keep a worker near the in-process rate (BENCHMARKS.md, "Feeding a GPU")."""
    loader_timeout_s: Annotated[Float, Field(ge=0), RESUME_SAFE] = 600.0
    """Longest wait for the next hand-off unit from a loader worker process before the pass
    fails with a DataError (a backstop for a read that never returns; 0 = wait forever)."""
    persistent_workers: Annotated[Bool, RESUME_SAFE] = True
    """Keep loader worker processes alive across epochs (train and eval loader each keep
    loader_workers processes); false: start them afresh every pass."""
