"""The streaming loader that training, evaluation and benchmarks share.

Per epoch, `partition.plan_epoch` says which (shard, start, stop) slices each DataLoader
worker of each rank reads; the worker streams them, shuffles through a buffer (training),
decodes raw uint8 bytes, shifts each image by ±2 px (training) and yields whole batches.

Equal batch counts survive bad data: in training a worker that lost samples to a corrupt
shard pads its last batches with repeats of samples it already yielded (counted in
`stats.padded`), because a rank that yields one batch fewer hangs every other rank in DDP.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import urls
from pipeline.data.augment import random_offsets
from pipeline.data.batch import Batch
from pipeline.data.config import DataConfig
from pipeline.data.info import (
    IMAGE_FIELD,
    INFO_NAME,
    PART_META_FIELD,
    DataError,
    DatasetInfo,
    MissingDataError,
    load_dataset_info,
    sha256_of,
)
from pipeline.data.partition import PartitionError, ShardSlice, WorkerPlan, plan_epoch
from pipeline.data.tario import TarFormatError, bad_name, iter_samples

log = logging.getLogger(__name__)
Parts = tuple[tuple[bytes, ...], tuple[int, ...]]  # each object's raw image bytes and class
Sample = tuple[bytes, Any, Parts | None]  # (raw image bytes, decoded label, parts)
_MAX_LOGGED = 10  # per worker: bad samples are counted always, logged only at first


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Which part of a split one rank reads in one pass; the settings come from DataConfig."""

    batch_size: int
    """Per-rank batch size."""
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    """With `seed`, fixes shard order, shuffle and augmentation: resuming replays an epoch."""
    seed: int = 0
    training: bool = True
    """True: shuffled, augmented, equal full batches on every rank. False: every sample once,
    in order."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}"
            )


STAT_NAMES = (
    "samples",
    "batches",
    "padded",
    "skipped_bad_shape",
    "skipped_bad_label",
    "skipped_missing_field",
    "skipped_bad_name",
    "lost_in_bad_shards",
    "bad_shards",
)


@dataclass(frozen=True)
class LoaderStats:
    """What one rank's loader did this epoch so far (summed over its workers)."""

    samples: int
    """Good samples put into batches (repeats used as padding excluded)."""
    batches: int
    padded: int
    """Repeats added in training to keep batch counts equal after losses."""
    skipped_bad_shape: int
    skipped_bad_label: int
    skipped_missing_field: int
    skipped_bad_name: int
    """Samples whose member names in the tar are not UTF-8."""
    lost_in_bad_shards: int
    """Samples never read because their shard was truncated, corrupt, could not be opened or
    downloaded (an HTTP error, a time-out)."""
    bad_shards: int
    """Shard slices whose reading failed."""

    @property
    def samples_skipped(self) -> int:
        return (
            self.skipped_bad_shape
            + self.skipped_bad_label
            + self.skipped_missing_field
            + self.skipped_bad_name
            + self.lost_in_bad_shards
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "samples_skipped": self.samples_skipped
        }


_PASS, _EPOCH = len(STAT_NAMES), len(STAT_NAMES) + 1  # slots after the stats


class _Counters:
    """Shared memory between the main process and its (persistent) DataLoader workers: the
    stats, and which pass (and epoch) is current. Workers stamp their counts with the pass
    they read, so work left over from an abandoned pass never counts in the next one."""

    def __init__(self, epoch: int) -> None:
        self.array = multiprocessing.get_context().Array("q", len(STAT_NAMES) + 2)
        self.array[_EPOCH] = epoch

    def add(self, pass_id: int, **counts: int) -> None:
        with self.array.get_lock():
            if self.array[_PASS] == pass_id:
                for name, n in counts.items():
                    self.array[STAT_NAMES.index(name)] += n

    def begin_pass(self, epoch: int) -> None:
        """Main process, before a pass: zero the stats, set the epoch workers will read."""
        with self.array.get_lock():
            self.array[: len(STAT_NAMES)] = [0] * len(STAT_NAMES)
            self.array[_PASS] += 1
            self.array[_EPOCH] = epoch

    def current(self) -> tuple[int, int]:
        """(pass id, epoch) of the pass now starting: read by each worker as it starts."""
        with self.array.get_lock():
            return self.array[_PASS], self.array[_EPOCH]

    def snapshot(self) -> LoaderStats:
        with self.array.get_lock():
            return LoaderStats(*self.array[: len(STAT_NAMES)])


class ShardStream(IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker yields its planned share."""

    def __init__(
        self, info: DatasetInfo, split: str, data: DataConfig, part: Pass, counters: _Counters
    ):
        self.info, self.split, self.data, self.part = info, split, data, part
        self.counters = counters
        self.urls = info.shard_urls(split)
        self.shard_sizes = [s.num_samples for s in info.split(split).shards]
        self.image_bytes = int(np.prod(info.image_shape))
        self._logged = 0
        self._pass = 0

    def plan(self, worker: int = 0) -> WorkerPlan:
        c = self.part
        ranks = plan_epoch(
            self.shard_sizes,
            batch_size=c.batch_size,
            world_size=c.world_size,
            num_workers=self.data.loader_workers,
            epoch=c.epoch,
            seed=c.seed,
            training=c.training,
        )
        return ranks[c.rank].workers[worker]

    def __iter__(self) -> Iterator[Batch]:
        """This worker's batches, up to `handoff_batches` of them per yielded Batch when it
        runs in a DataLoader worker process (the main process splits them again): the
        per-object cost of the hand-off between processes is paid per unit, not per batch."""
        worker_info = get_worker_info()
        worker = worker_info.id if worker_info is not None else 0
        self._pass, epoch = self.counters.current()  # persistent workers: the epoch now
        self.part = c = replace(self.part, epoch=epoch)
        plan = self.plan(worker)
        seed_words = [c.seed, c.epoch, c.rank, worker]
        rand = random.Random(":".join(map(str, seed_words))).random
        np_rng = np.random.default_rng(seed_words)
        samples = self._read(plan.slices)
        if c.training:
            samples = _shuffled(samples, self.data.shuffle_buffer, rand)
        unit: list[tuple[list[Sample], int]] = []
        per_unit, most = 1, self.handoff_batches if worker_info is not None else 1
        for piece in self._batches(samples, plan, rand, worker):
            unit.append(piece)
            if len(unit) == per_unit:
                yield self._collate(unit, np_rng)
                # Units grow 1, 2, 4, ... batches: the first batch of a pass comes as soon
                # as in-process, and a pass cut short leaves little unused work behind.
                unit, per_unit = [], min(2 * per_unit, most)
        if unit:
            yield self._collate(unit, np_rng)

    @property
    def handoff_batches(self) -> int:
        """Batches per hand-off from a worker process (data.handoff_samples, at least one)."""
        return max(1, self.data.handoff_samples // self.part.batch_size)

    # --- reading ---------------------------------------------------------------------------

    def _read(self, slices: tuple[ShardSlice, ...]) -> Iterator[Sample]:
        for piece in slices:
            yield from self._read_slice(self.urls[piece.shard], piece)

    def _read_slice(self, url: str, piece: ShardSlice) -> Iterator[Sample]:
        want = piece.stop - piece.start
        seen = 0
        try:
            stream = urls.open_stream(url, timeout_s=self.data.url_timeout_s)
        except (OSError, ValueError) as err:
            self._bad_shard(url, f"cannot open ({err})", want)
            return
        problem: str | None = None
        try:
            for index, (key, sample_fields) in enumerate(iter_samples(urls.raw_reader(stream))):
                if index < piece.start:
                    continue
                seen += 1
                sample = self._decode(url, key, sample_fields)
                if sample is not None:
                    yield sample
                if seen == want:
                    break
        except (TarFormatError, OSError) as err:
            problem = str(err)
        except BaseException:
            urls.close(stream)  # stopped early (or on_error=raise): that is the error to see
            raise
        # A failed download (HTTP error, time-out) ends the data early: it, not the tar parser's
        # "truncated", says what went wrong. Once the slice is read, how the rest went is moot.
        failure = urls.close(stream)
        if seen == want and problem is None:
            if failure is not None:
                log.debug("ignored error closing %s after its slice: %s", url, failure)
            return
        if isinstance(failure, urls.TransferError):
            problem = failure.problem
        elif failure is not None:  # e.g. `aws s3 cp` found no such key: the pipe's exit status
            problem = f"{failure}; {problem}" if problem else str(failure)
        elif problem is None:
            problem = f"holds fewer samples than dataset.json says (ended at {piece.start + seen})"
        self._bad_shard(url, problem, want - seen)

    def _decode(self, url: str, key: str, sample_fields: dict[str, bytes]) -> Sample | None:
        image = sample_fields.get(IMAGE_FIELD)
        raw_label = sample_fields.get(self.info.label_field)
        problem = self._problem(image, raw_label, sample_fields)
        # Names not UTF-8 (see tario.bad_name) mean a damaged or foreign header: skip the sample
        # if they touch its key or a field it needs (isascii first: free for good names).
        if (not key.isascii() and bad_name(key)) or (
            problem is not None and any(bad_name(f) for f in sample_fields)
        ):
            names = [f"{key}.{f}".encode("utf-8", "surrogateescape") for f in sample_fields]
            problem = "skipped_bad_name", f"member names not UTF-8: {names}"
        if problem is not None:
            self._bad_sample(*problem, url, key)
            return None
        assert image is not None and raw_label is not None
        label = int(raw_label) if self.info.label_kind == "index" else raw_label
        if not self.info.part_fields:
            return image, label, None
        parts = self._parts(sample_fields)
        if isinstance(parts, str):
            self._bad_sample("skipped_bad_label", parts, url, key)
            return None
        return image, label, parts

    def _parts(self, sample_fields: dict[str, bytes]) -> Parts | str:
        """Each object's image and class, or what is wrong with them."""
        names = self.info.part_fields
        images = tuple(sample_fields.get(name, b"") for name in names)
        if any(len(image) != self.image_bytes for image in images):
            return f"part images {names} of {[len(i) for i in images]} bytes, expected {self.image_bytes}"
        try:
            classes = tuple(json.loads(sample_fields[PART_META_FIELD])["classes"])
        except (KeyError, TypeError, ValueError) as err:
            return f"no part classes in its {PART_META_FIELD} field ({type(err).__name__}: {err})"
        if len(classes) != len(names) or not all(
            isinstance(c, int) and 0 <= c < self.info.num_classes for c in classes
        ):
            return f"part classes {classes!r} do not name one class per part image {names}"
        return images, classes

    def _problem(
        self, image: bytes | None, raw_label: bytes | None, sample_fields: dict[str, bytes]
    ) -> tuple[str, str] | None:
        """(stat name, detail) of what is wrong with a sample, or None."""
        if image is None or raw_label is None:
            return "skipped_missing_field", f"fields {sorted(sample_fields)}"
        if len(image) != self.image_bytes:
            shape = self.info.image_shape
            return (
                "skipped_bad_shape",
                f"{len(image)} image bytes, expected {self.image_bytes} for {shape}",
            )
        if self.info.label_kind == "multi-hot":
            if len(raw_label) != self.info.num_classes:
                return "skipped_bad_label", f"{len(raw_label)} label bytes"
            return None
        try:
            label = int(raw_label)
        except ValueError:
            label = -1
        if not 0 <= label < self.info.num_classes:
            return "skipped_bad_label", f"label {raw_label[:20]!r}"
        return None

    def _bad_sample(self, reason: str, detail: str, url: str, key: str) -> None:
        shown = key.encode("utf-8", "surrogateescape") if bad_name(key) else key
        message = f"{url}: sample {shown!r}: {detail}"
        if self.data.on_error == "raise":
            raise DataError(message)
        self.counters.add(self._pass, **{reason: 1})
        if self._logged < _MAX_LOGGED:
            self._logged += 1
            log.warning("skipping %s", message)

    def _bad_shard(self, url: str, detail: str, lost: int) -> None:
        message = f"{url}: {detail}"
        if self.data.on_error == "raise":
            raise DataError(message)
        self.counters.add(self._pass, bad_shards=1, lost_in_bad_shards=lost)
        log.warning("bad shard, %d sample(s) lost: %s", lost, message)

    # --- batching --------------------------------------------------------------------------

    def _batches(
        self,
        samples: Iterator[Sample],
        plan: WorkerPlan,
        rand: Any,
        worker: int,
    ) -> Iterator[tuple[list[Sample], int]]:
        """This worker's batches as (samples, how many of them are padding repeats)."""
        bs = self.part.batch_size
        batch: list[Sample] = []
        emitted, last_full = 0, []
        for sample in samples:
            batch.append(sample)
            if len(batch) == bs:
                yield batch, 0
                emitted, last_full, batch = emitted + 1, batch, []
        if not self.part.training:
            if batch:
                yield batch, 0
            return
        pool = last_full + batch
        while emitted < plan.num_batches:
            if not pool:
                raise DataError(
                    f"rank {self.part.rank} worker {worker}: no readable sample in its {len(plan.slices)} "
                    f"slice(s) of split {self.split!r}, so it cannot yield its {plan.num_batches} batch(es)"
                )
            fill = [pool[int(rand() * len(pool))] for _ in range(bs - len(batch))]
            yield batch + fill, len(fill)
            emitted, batch = emitted + 1, []

    def _collate(
        self, pieces: list[tuple[list[Sample], int]], np_rng: np.random.Generator
    ) -> Batch:
        """One Batch of uint8 pixels (and pending shifts) from consecutive batches' samples."""
        batch = [sample for samples, _ in pieces for sample in samples]
        n, shape = len(batch), self.info.image_shape
        # bytearray.join gives a writable buffer, so torch needs no extra copy or warning.
        pixels = np.frombuffer(bytearray().join(image for image, _, _ in batch), dtype=np.uint8)
        images_u8 = pixels.reshape(n, *shape)
        parts_u8 = part_classes = None
        if batch[0][2] is not None:  # every sample of a multi-object dataset has parts
            part_pixels = bytearray().join(b"".join(s[2][0]) for s in batch)  # type: ignore[index]
            parts_u8 = np.frombuffer(part_pixels, dtype=np.uint8).reshape(n, -1, *shape)
            part_classes = torch.tensor([s[2][1] for s in batch], dtype=torch.int64)  # type: ignore[index]
        shifts, p = None, 0
        if self.part.training and self.data.augment and self.data.max_shift:
            # One offset per sample, applied to its parts too (in Batch.to): each part stays
            # the exact reconstruction target of its object in the shifted input.
            # Drawn per batch, so the offsets do not depend on how batches are handed over.
            p = self.data.max_shift
            drawn = [np.stack(random_offsets(len(s), p, np_rng), axis=1) for s, _ in pieces]
            shifts = torch.from_numpy(np.concatenate(drawn))
        images = torch.from_numpy(images_u8)
        parts = None if parts_u8 is None else torch.from_numpy(parts_u8)
        if self.info.label_kind == "index":
            labels = torch.tensor([label for _, label, _ in batch], dtype=torch.int64)
        else:
            hot = np.frombuffer(bytearray().join(label for _, label, _ in batch), dtype=np.uint8)
            labels = torch.from_numpy(hot.reshape(n, self.info.num_classes)).to(torch.float32)
        padded = sum(p for _, p in pieces)
        self.counters.add(self._pass, samples=n - padded, batches=len(pieces), padded=padded)
        return Batch(images, labels, parts, part_classes, shifts=shifts, max_shift=p)


def _shuffled(items: Iterator[Sample], size: int, rand: Any) -> Iterator[Sample]:
    """A shuffle buffer: emit a random held item each time a new one arrives."""
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rand() * size)
        buffer[j], item = item, buffer[j]
        yield item
    # Drain in random order (Fisher-Yates with the same generator).
    for i in range(len(buffer) - 1, 0, -1):
        j = int(rand() * (i + 1))
        buffer[i], buffer[j] = buffer[j], buffer[i]
    yield from buffer


def _within_time_limit(units: Iterator[Batch], data: DataConfig) -> Iterator[Batch]:
    """The units, with DataLoader's time-out (a RuntimeError) as a DataError naming the key."""
    while True:
        try:
            unit = next(units)
        except StopIteration:
            return
        except RuntimeError as err:
            if "timed out" not in str(err):
                raise
            raise DataError(
                f"no data from a loader worker in {data.loader_timeout_s:g} s "
                f"(data.loader_timeout_s={data.loader_timeout_s:g}): a shard read that never "
                f"returns? raise the limit for slow storage, 0 to wait forever"
            ) from None
        yield unit


class ShardLoader:
    """Iterable of `Batch`es (uint8 pixels and pending shifts: call `.to(device)`) for one rank
    and epoch; iterate it again for the next pass, after `set_epoch` in training. Its worker
    processes persist across passes (data.persistent_workers) until `close()`."""

    def __init__(self, info: DatasetInfo, split: str, data: DataConfig, part: Pass):
        self.info, self.split, self.data, self.part = info, split, data, part
        self._counters = _Counters(part.epoch)
        self.dataset = ShardStream(info, split, data, part, self._counters)
        self._loader: DataLoader | None = None

    def _workers(self) -> range:
        return range(max(self.data.loader_workers, 1))

    def __len__(self) -> int:
        """Batches this rank yields this epoch (identical on every rank when training)."""
        return sum(self.dataset.plan(w).num_batches for w in self._workers())

    @property
    def num_samples(self) -> int:
        """Samples this rank reads this epoch (before any skips)."""
        return sum(self.dataset.plan(w).num_samples for w in self._workers())

    @property
    def stats(self) -> LoaderStats:
        """Counts for the current (or last) pass; reset when a new pass starts."""
        return self._counters.snapshot()

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch` on the next pass (new shard order, shuffle and shifts)."""
        self.part = replace(self.part, epoch=epoch)
        self.dataset.part = self.part

    def __iter__(self) -> Iterator[Batch]:
        self._counters.begin_pass(self.part.epoch)
        if self.data.loader_workers == 0:
            return iter(self.dataset)
        if self._loader is None or not self.data.persistent_workers:
            self._loader = DataLoader(
                self.dataset,
                batch_size=None,  # workers yield whole batches (handoff_batches at a time)
                num_workers=self.data.loader_workers,
                pin_memory=self.data.pin_memory,
                prefetch_factor=self.data.prefetch_factor,
                persistent_workers=self.data.persistent_workers,
                timeout=self.data.loader_timeout_s,
            )
        units = iter(self._loader)  # now: the workers start preparing this pass at once
        size = self.part.batch_size
        return (
            batch for unit in _within_time_limit(units, self.data) for batch in unit.split(size)
        )

    def close(self) -> None:
        """Stop persistent worker processes now (garbage collection stops them too)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None


def make_loader(
    data: DataConfig,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    training: bool = True,
    verify_checksums: bool | None = None,
    check_remote: bool = True,
    info: DatasetInfo | None = None,
) -> ShardLoader:
    """The loader for one rank of one split of `data.shards`; fails here, not mid-epoch, on
    missing data. `verify_checksums` overrides data.verify_checksums (e.g. only on the first
    epoch); `check_remote=False` skips probing http(s) shards (one request each; e.g. after
    the first epoch); `info` saves re-reading dataset.json."""
    info = info or load_dataset_info(data.shards, timeout_s=data.url_timeout_s)
    part = Pass(
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        training=training,
    )
    verify = data.verify_checksums if verify_checksums is None else verify_checksums
    check_shards(
        info, split, verify_checksums=verify, probe=check_remote, timeout_s=data.url_timeout_s
    )
    loader = ShardLoader(info, split, data, part)
    try:
        len(loader)  # runs the partition, which rejects a split too small for the ranks
    except PartitionError as err:
        raise DataError(f"{info.name} split {split!r} (world_size={world_size}): {err}") from err
    return loader


def open_loader(
    source: str | os.PathLike[str] | DatasetInfo, split: str = "train", **kwargs: Any
) -> ShardLoader:
    """make_loader for notebooks, benchmarks and tests: `source` is a shard folder, URL or
    DatasetInfo, and the keywords are make_loader's (batch_size, rank, ...) or DataConfig
    fields (loader_workers defaults to 0 here: read in this process)."""
    info = source if isinstance(source, DatasetInfo) else None
    per_call = {
        "batch_size",
        "rank",
        "world_size",
        "epoch",
        "seed",
        "training",
        "verify_checksums",
        "check_remote",
    }
    call = {k: kwargs.pop(k) for k in per_call & set(kwargs)}
    kwargs.setdefault("loader_workers", 0)
    data = DataConfig(shards=info.base_url if info else os.fspath(source), **kwargs)
    return make_loader(data, split, info=info, **call)


def check_shards(
    info: DatasetInfo,
    split: str,
    *,
    verify_checksums: bool = False,
    probe: bool = True,
    timeout_s: float | None = None,
) -> None:
    """Every shard of `split` exists, else one MissingDataError listing all missing ones;
    optionally their sha256. Local files are looked up, http(s) URLs probed (a 1-byte GET
    each, all at once, under `timeout_s`) unless `probe` is False; s3:// and gs:// shards are
    not probed (one CLI call per shard), so a missing one is only found when it is read."""
    _check_shards(
        info, [split], verify_checksums=verify_checksums, probe=probe, timeout_s=timeout_s
    )


_MAX_LISTED = 20


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _check_shards(
    info: DatasetInfo,
    splits: Sequence[str],
    *,
    verify_checksums: bool,
    probe: bool = True,
    timeout_s: float | None,
) -> None:
    shards = {
        url: shard
        for split in splits
        for url, shard in zip(info.shard_urls(split), info.split(split).shards, strict=True)
    }
    where = f"{info.name} split{'s' if len(splits) > 1 else ''} " + ", ".join(map(repr, splits))
    unreachable = urls.probe_all(shards, timeout_s=timeout_s) if probe else {}
    missing = [
        f"{url} ({unreachable[url]})" if url in unreachable else url
        for url in shards
        if url in unreachable or ((p := urls.local_path(url)) is not None and not os.path.isfile(p))
    ]
    if missing:
        raise MissingDataError(f"{where}: missing or unreachable shard(s): {_listing(missing)}")
    if not verify_checksums:
        return
    bad = []
    for url, shard in shards.items():
        try:
            size, digest = sha256_of(url, timeout_s=timeout_s)
        except (OSError, ValueError) as err:
            bad.append(f"{url} (unreadable: {err})")
            continue
        if (size, digest) != (shard.bytes, shard.sha256):
            bad.append(
                f"{url} ({size} bytes, sha256 {digest[:12]}…; expected {shard.bytes}, {shard.sha256[:12]}…)"
            )
    if bad:
        raise DataError(f"{where}: checksum mismatch: {_listing(bad)}")


def check_splits(
    data: DataConfig,
    info: DatasetInfo | None = None,
    splits: tuple[str | None, str | None] | None = None,
    *,
    batch_size: int,
    world_size: int = 1,
    verify_checksums: bool | None = None,
) -> DatasetInfo:
    """Fail fast, before any worker starts, on data a run cannot use; returns the info.

    `splits` is (train split, eval split), default (data.train_split, data.eval_split); None
    skips one. Checks, each reporting every problem it finds at once: both splits exist
    (DataError listing the available ones) and are non-empty; the train split gives every
    one of `world_size` ranks at least one full batch of `batch_size`, the eval split at
    least one sample per rank; every shard exists (MissingDataError; http(s) probed, see
    check_shards); with `verify_checksums` (default data.verify_checksums), every shard's
    size and sha256 match dataset.json. `info` saves re-reading data.shards.
    """
    info = info or load_dataset_info(data.shards, timeout_s=data.url_timeout_s)
    train, evaluate = (data.train_split, data.eval_split) if splits is None else splits
    roles = [
        (s, k, t)
        for s, k, t in ((train, "data.train_split", True), (evaluate, "data.eval_split", False))
        if s
    ]
    source = f"{info.base_url}/{INFO_NAME}" if info.base_url else info.name
    problems = []
    for split, key, training in roles:
        if split not in info.splits:
            problems.append(
                f"{key} is {split!r}, a split {source} does not have; "
                f"available: {', '.join(sorted(info.splits)) or 'none'}"
            )
            continue
        sizes = [s.num_samples for s in info.splits[split].shards]
        if sum(sizes) == 0:
            problems.append(f"{key}: split {split!r} of {source} is empty")
            continue
        try:
            plan_epoch(
                sizes,
                batch_size=batch_size,
                world_size=world_size,
                num_workers=data.loader_workers,
                training=training,
            )
        except PartitionError as err:
            problems.append(f"{key}: split {split!r} (world_size={world_size}): {err}")
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else "; ".join(problems))
    verify = data.verify_checksums if verify_checksums is None else verify_checksums
    names = list(dict.fromkeys(split for split, _, _ in roles))
    _check_shards(info, names, verify_checksums=verify, timeout_s=data.url_timeout_s)
    return info
