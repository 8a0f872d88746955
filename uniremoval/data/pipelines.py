"""WebDataset streams for every stage: teacher, KT, DA (mixed, step-based) and evaluation.

Shards are webdataset tars (see shards/README.md): `input.<ext>`, optional `target.<ext>`,
`json`, and in cache shards `teacher.png` + `feature.npy`. URLs are opened with webdataset's
`gopen`, so local paths, `file:`, `http(s)://` (through curl) and `pipe:` commands all work.

How the data is split, and why not `wds.split_by_node` / `wds.split_by_worker`:
- rank and world size are passed in explicitly (the caller reads them from accelerate's state);
  webdataset's splitters read torch.distributed globals, and they leave a worker with nothing
  when there are fewer shards than (ranks x workers), which hangs DDP.
- `assign_shards` gives each of the W = world_size x num_workers global workers whole shards
  when there are at least W shards; otherwise workers share a shard and each keeps every m-th
  sample of it. Either way every sample goes to exactly one worker per pass.
- Training streams are endless: pass after pass over a freshly permuted shard list (same
  permutation on every rank, so the split stays disjoint), through a sample shuffle buffer.
  Each epoch starts at a random sample of its first local shard, so short epochs still reach
  every part of every shard. Each rank yields exactly `steps_per_epoch` batches per epoch (its
  workers share the count), whatever the shard counts: no rank waits for another in DDP.
- Never pass these loaders through `accelerator.prepare()` (it hangs or duplicates data); move
  batches to the device yourself.

Mixing: every training batch holds every degradation type. Per batch, each type gets one slot
(filled from that type's sources by weight) and the remaining slots are drawn from all sources by
weight; the slots are then shuffled. The degradation label is the source's type, checked against
the sample's json.

Bad samples: a sample that does not decode, lacks a required field (a paired dataset without its
target), or whose sizes disagree is never used. With `bad_samples="skip"` it is counted and each
training batch carries `bad_samples`, the number skipped by its worker since that worker's
previous batch (sum them in the training loop); evaluation yields a record with `error` instead.
With `bad_samples="fail"` a DataError names the shard and the key. A truncated or unreadable
shard counts as one bad sample (the complete samples before the cut are kept).

Images smaller than the crop: a training sample whose image is smaller than `crop_size` on either
side is kept, and its crops are mirror-padded at the bottom/right (`paired_crop`). Padding may be
meant for a few odd images, but a dataset of small images would train on mirrored borders, so it is
never silent: each training batch carries `padded_samples`, how many of its samples were padded
(beside `bad_samples`; sum them in the training loop), and the loader warns once, naming the first
padded sample, its size, the crop and what to change (`CropPadding`).
"""

from __future__ import annotations

import functools
import json
import math
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from uniremoval.data.shard_stream import (
    ShardReadError,
    ShardSpec,
    assign_shards,
    count_samples,
    iter_shard,
    read_position,
    resolve_shards,
    worker_id,
)
from uniremoval.data.transforms import (
    IMAGE_EXTS,
    ORIENTED_FIELDS,
    Aug,
    apply_orientation,
    decode_feature,
    decode_image,
    decode_problem,
    meta_orientation,
    paired_crop,
    to_tensor,
)
from uniremoval.errors import ConfigError, DataError

BadPolicy = Literal["skip", "fail"]
OPTIONAL_FIELDS = ("target", "teacher", "feature")


# --------------------------------------------------------------------------------------------
# Decoding one sample
# --------------------------------------------------------------------------------------------


class BadSample(Exception):
    """A sample that must not be used; the message says why."""


def _find(files: dict[str, bytes], stem: str) -> bytes | None:
    for ext in IMAGE_EXTS:
        data = files.get(f"{stem}.{ext}")
        if data is not None:
            return data
    return None


def decode_sample(
    files: dict[str, bytes], require: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Decode the fields of one raw sample: 'input' always, `require` (else BadSample) and
    `optional` when present; input and target turned upright by the json `orientation`. Images
    must share one size; a feature grid must be (C, H//c, W//c) for some cell c (checked against
    the cell by the caller)."""
    out: dict[str, Any] = {}
    meta_raw = files.get("json")
    try:
        out["meta"] = json.loads(meta_raw) if meta_raw is not None else {}
    except ValueError as exc:
        raise BadSample(f"json does not parse: {exc}") from exc
    if not isinstance(out["meta"], dict):
        raise BadSample(f"json is a {type(out['meta']).__name__}, not an object")
    try:
        turn = meta_orientation(out["meta"])
    except ValueError as exc:
        raise BadSample(str(exc)) from exc
    data = _find(files, "input")
    if data is None:
        raise BadSample(f"no input image (fields: {sorted(files)})")
    try:
        out["input"] = apply_orientation(decode_image(data), turn)
    except Exception as exc:  # any decoder error means this one sample is unusable
        raise BadSample(f"input does not decode: {decode_problem(exc, data)[1]}") from exc
    h, w = out["input"].shape[:2]
    for name in (*require, *optional):
        if name in out:
            continue
        raw = files.get("feature.npy") if name == "feature" else _find(files, name)
        if raw is None:
            if name in require:
                raise BadSample(f"missing required '{name}' (fields: {sorted(files)})")
            continue
        try:
            if name == "feature":
                out[name] = decode_feature(raw)
            else:
                out[name] = apply_orientation(decode_image(raw), turn if name in ORIENTED_FIELDS else 1)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if name == "feature" else decode_problem(exc, raw)[1]
            raise BadSample(f"{name} does not decode: {reason}") from exc
        if name != "feature" and out[name].shape[:2] != (h, w):
            raise BadSample(f"{name} is {out[name].shape[1]}x{out[name].shape[0]}, input is {w}x{h}")
    return out


def _check_grid(sample: dict[str, Any], cell: int) -> None:
    if "feature" not in sample:
        return
    h, w = sample["input"].shape[:2]
    grid = sample["feature"].shape[1:]
    if grid != (h // cell, w // cell) or 0 in grid:
        raise BadSample(f"feature grid {grid} does not match a {w}x{h} image at cell {cell}")


# --------------------------------------------------------------------------------------------
# Training streams
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One dataset feeding a training stream; `degradation` is its label (or 'clear')."""

    name: str
    shards: tuple[str, ...]
    degradation: str
    weight: float = 1.0


def make_sources(specs: Iterable[Any]) -> list[Source]:
    """Accept Source objects or (name, shards, degradation[, weight]) tuples; resolve shards."""
    out = []
    for spec in specs:
        if isinstance(spec, Source):
            src = spec
        else:
            if not 3 <= len(spec) <= 4:
                raise ConfigError(f"source {spec!r}: expected (name, shards, degradation[, weight])")
            name, shards, deg = spec[:3]
            weight = float(spec[3]) if len(spec) == 4 else 1.0
            src = Source(str(name), tuple(resolve_shards(shards)), str(deg), weight)
        if not src.weight > 0:
            raise ConfigError(f"source {src.name}: weight must be > 0, got {src.weight}")
        if not src.shards:
            raise ConfigError(f"source {src.name}: no shards")
        out.append(src)
    if not out:
        raise ConfigError("no data sources given")
    return out


_PADDED_WARNING = "_padded_warning"  # batch key from worker to StepLoader, removed before the batch is yielded


class _Counter:
    """Per worker, since the last batch it yielded: bad samples skipped (`n`) and samples smaller
    than the crop (`padded`); and the warning naming the first padded sample, sent with one batch."""

    def __init__(self) -> None:
        self.n = 0
        self.padded = 0
        self.padded_warning: str | None = None
        self._warning_sent = False

    def take(self) -> int:
        n, self.n = self.n, 0
        return n

    def note_padded(self, warning: Callable[[], str]) -> None:
        self.padded += 1
        if self.padded_warning is None and not self._warning_sent:
            self.padded_warning = warning()

    def put_padded(self, batch: dict[str, Any]) -> None:
        """Move the padded count (and, once per worker, the warning) into `batch`."""
        batch["padded_samples"], self.padded = self.padded, 0
        if self.padded_warning is not None:
            batch[_PADDED_WARNING], self.padded_warning, self._warning_sent = self.padded_warning, None, True


class CropPadding:
    """Training samples smaller than the crop on this rank: counted, and named in one warning.

    Every training batch carries `padded_samples`; the StepLoader adds them into `samples` and gives
    the first padded sample's warning (RuntimeWarning) once per CropPadding, in the main process
    (DataLoader workers send it with a batch). A loader makes its own by default; the stages keep one
    per run and hand it to each epoch's loader, so a run warns once per rank, not once per epoch.
    """

    def __init__(self) -> None:
        self.samples = 0  # padded samples this rank read through the loaders given this object
        self.warned = False

    def update(self, batch: dict[str, Any]) -> None:
        self.samples += int(batch.get("padded_samples", 0))
        warning = batch.pop(_PADDED_WARNING, None)
        if warning is not None and not self.warned:
            self.warned = True
            warnings.warn(warning, RuntimeWarning, stacklevel=3)


def _padding_warning(src: Source, url: str, key: str, h: int, w: int, spec: _StreamSpec, rank: int) -> str:
    crop = spec.crop
    # The largest crop this image holds: MPRNet needs multiples of 8, a cached feature grid its cell.
    step = math.lcm(8, spec.cell) if "feature" in spec.require else 8
    fits = min(h, w) // step * step
    lower = f"lower data.crop_size (to {fits} or less for this image)" if fits >= 16 else "lower data.crop_size"
    return (
        f"training crop {crop}x{crop} (data.crop_size={crop}) is larger than sample {key} of source {src.name} "
        f"({w}x{h} px, shard {url}): its crops are mirror-padded at the bottom/right, as are those of every "
        f"other training image smaller than the crop. Training goes on and counts them (train/padded_samples "
        f"in MLflow; this warning: once per run on rank {rank}). To train on real pixels only, {lower}, or rebuild "
        f"the shards from images at least {crop} px on each side (`uniremoval shards inspect <shard folder>` "
        f"shows the smallest height and width)"
    )


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _fail_or_count(policy: BadPolicy, counter: _Counter, where: str, reason: str) -> None:
    if policy == "fail":
        raise DataError(f"bad sample {where}: {reason}. Fix or drop it (`uniremoval shards verify` lists every "
                        f"bad sample), or set data.bad_samples=skip to train past it")
    counter.n += 1
    # Named once per distinct problem (the warnings registry dedupes repeats over passes).
    warnings.warn(f"skipped bad sample {where}: {reason} (data.bad_samples=skip)", RuntimeWarning, stacklevel=2)


@dataclass
class _StreamSpec:
    """What one training stream reads and how it crops; pickled into DataLoader workers."""

    require: tuple[str, ...]
    crop: int | None
    cell: int
    augment: Aug  # the symmetries a sample may be given (data.augment)
    shuffle_buffer: int
    bad_samples: BadPolicy
    clear_from_target: bool = False  # DA clear sources: take a paired sample's target
    shuffle_bytes: int | None = None  # the buffer's cap in raw bytes (data.shuffle_buffer_mb)
    # KT on a cache: degradation -> the sha256 of the teacher whose outputs its samples must hold
    teachers: tuple[tuple[str, str], ...] = ()


def _raw_size(item: tuple[str, str, dict[str, bytes]]) -> int:
    """Bytes of one raw sample's members (url, key, {member: bytes})."""
    return sum(len(v) for v in item[2].values())


def _source_stream(
    src: Source,
    src_index: int,
    spec: _StreamSpec,
    seed: int,
    epoch: int,
    rank: int,
    worker: int,
    gworker: int,
    n_gworkers: int,
    counter: _Counter,
) -> Iterator[dict[str, Any]]:
    """Endless cropped samples of one source for one global worker; padded ones noted in `counter`."""
    rng = _rng(seed, 7, src_index, epoch, rank, worker)
    buffer: list[tuple[str, str, dict[str, bytes]]] = []
    optional = ("target",) if spec.clear_from_target else ()
    pass_len = [0]  # raw samples in this worker's last full pass, bounds the bad-run check

    def raw_passes() -> Iterator[tuple[str, str, dict[str, bytes]]]:
        n = len(src.shards)
        share_all = False
        for p in range(1 << 62):
            # The same permutation on every rank and worker keeps the split disjoint.
            order = _rng(seed, 11, src_index, epoch, p).permutation(n)
            # A worker whose share is empty (a shard with fewer samples than the workers sharing
            # it) reads the whole source instead: a few duplicates beat a rank with no data.
            work = [(s, 1, 0) for s in range(n)] if share_all else assign_shards(n, gworker, n_gworkers)
            # (shard, stride, offset, first, end): this worker's samples k = i // stride in [first, end).
            visits = [(s, stride, offset, 0, 1 << 62) for s, stride, offset in work]
            if p == 0:
                # Every epoch is a fresh stream. Starting it at a random sample of its first shard
                # (and reading that shard's head at the end of the pass) keeps an epoch shorter than
                # a pass from reading the same head of each shard every epoch, and never the rest.
                s0, stride, offset = work[0]
                total = count_samples(src.shards[order[s0]])
                mine = max(0, (total or 0) - offset + stride - 1) // stride
                if mine > 1:
                    first = int(_rng(seed, 13, src_index, epoch, rank, worker).integers(0, mine))
                    visits[0] = (s0, stride, offset, first, 1 << 62)
                    visits.append((s0, stride, offset, 0, first))
            seen = 0
            for shard_i, stride, offset, first, end in visits:
                url = src.shards[order[shard_i]]

                def mine(i: int, stride=stride, offset=offset, first=first, end=end) -> bool | None:
                    # this worker's samples only: the others' are seeked past, not read
                    return None if i // stride >= end else i % stride == offset and i // stride >= first

                try:
                    for key, files in iter_shard(url, mine):
                        seen += 1
                        yield url, key, files
                except ShardReadError as exc:
                    _fail_or_count(spec.bad_samples, counter, f"in shard {exc.url}", str(exc))
            pass_len[0] = seen
            if seen == 0:
                if share_all:
                    raise DataError(
                        f"source {src.name}: no sample could be read from its shards {list(src.shards)}"
                    )
                share_all = True

    def shuffled() -> Iterator[tuple[str, str, dict[str, bytes]]]:
        # Raw bytes in the buffer (not decoded arrays): far less memory per slot. It holds up to
        # shuffle_buffer samples and at most shuffle_bytes of them (1000 cached 720p samples, several MB
        # each, were GBs per source in every loader worker). Filled, each new sample takes a random
        # slot's place; past the byte cap, random slots leave until it holds again (one at least).
        cap = spec.shuffle_bytes if spec.shuffle_bytes is not None else float("inf")
        held = 0
        for item in raw_passes():
            size = _raw_size(item)
            if len(buffer) < spec.shuffle_buffer and (held + size <= cap or not buffer):
                buffer.append(item)
                held += size
                continue
            j = int(rng.integers(0, len(buffer)))
            buffer[j], item = item, buffer[j]
            held += size - _raw_size(item)
            yield item
            while held > cap and len(buffer) > 1:
                j = int(rng.integers(0, len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                item = buffer.pop()
                held -= _raw_size(item)
                yield item

    bad_run = 0
    teacher = dict(spec.teachers).get(src.degradation)  # whose outputs a cached sample must hold
    for url, key, files in shuffled():
        try:
            s = decode_sample(files, spec.require, optional)
            _check_grid(s, spec.cell)
            meta_deg = s["meta"].get("degradation")
            if spec.clear_from_target:
                if "target" in s:
                    s["input"] = s.pop("target")
                elif meta_deg not in (None, "clear"):
                    raise BadSample(f"a '{meta_deg}' image without target cannot serve as a clear image")
            elif meta_deg is not None and meta_deg != src.degradation:
                raise BadSample(
                    f"json says degradation '{meta_deg}', source {src.name} is '{src.degradation}'"
                )
            by = s["meta"].get("teacher_sha256")
            if by and teacher and by != teacher:
                # Checked at the start from the cache's manifest; a cache rebuilt by other weights while
                # the run trains (or a pipe:/URL one, which the start cannot check) is caught here.
                raise DataError(
                    f"shard {url}, key {key}: its teacher output is by weights sha256 {str(by)[:12]}, but "
                    f"teachers.checkpoints.{src.degradation} is {teacher[:12]}: the cache was (re)built by other "
                    f"teacher weights; rerun `uniremoval cache` with this config, then KT with --resume auto"
                )
        except BadSample as exc:
            _fail_or_count(spec.bad_samples, counter, f"in shard {url}, key {key}", str(exc))
            bad_run += 1
            # With 'skip', a source whose samples are all bad would spin forever: a hang. Many
            # passes' worth of bad samples in a row means there is nothing usable.
            if pass_len[0] and bad_run > 4 * (pass_len[0] + spec.shuffle_buffer) + 16:
                raise DataError(
                    f"source {src.name}: {bad_run} bad samples in a row and none usable "
                    f"(last: shard {url}, key {key}: {exc})"
                ) from exc
            continue
        bad_run = 0
        h, w = s["input"].shape[:2]
        # paired_crop pads exactly these. (A feature grid trims the image to whole cells first, but
        # the crop is a multiple of the cell, so an image at least crop-sized keeps a crop-sized grid.)
        if spec.crop is not None and (h < spec.crop or w < spec.crop):
            counter.note_padded(functools.partial(_padding_warning, src, url, key, h, w, spec, rank))
        images = {k: s[k] for k in ("input", *spec.require) if k != "feature"}
        crops, grid, _ = paired_crop(images, s.get("feature"), spec.crop, spec.cell, rng, spec.augment)
        if grid is not None:
            crops["feature"] = grid
        crops["key"] = key
        yield crops


class _Mixer:
    """Per-batch composition: one slot per required type, the rest drawn by source weight."""

    def __init__(self, sources: list[Source], cover: Sequence[str], batch_size: int):
        self.sources, self.batch_size = sources, batch_size
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.p_all = w / w.sum()
        self.per_type: list[tuple[np.ndarray, np.ndarray]] = []
        for d in cover:
            idx = np.array([i for i, s in enumerate(sources) if s.degradation == d])
            self.per_type.append((idx, w[idx] / w[idx].sum()))
        if batch_size < len(cover):
            raise ConfigError(f"batch size {batch_size} cannot hold one sample of each of {len(cover)} types; "
                              f"set data.batch_size >= {len(cover)}")

    def plan(self, rng: np.random.Generator) -> list[int]:
        slots = [int(rng.choice(idx, p=p)) for idx, p in self.per_type]
        rest = self.batch_size - len(slots)
        slots += [int(i) for i in rng.choice(len(self.sources), size=rest, p=self.p_all)]
        rng.shuffle(slots)
        return slots


def _collate(samples: list[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    # In a DataLoader worker, build the batch straight in shared memory (as default_collate does):
    # it then crosses to the main process without another copy.
    shared = get_worker_info() is not None
    batch: dict[str, Any] = {}
    for f in fields:
        first = samples[0][f]
        shape = (
            (len(samples), *first.shape)
            if f == "feature"
            else (len(samples), first.shape[2], *first.shape[:2])
        )
        out = torch.empty(shape, dtype=torch.float32)
        if shared:
            out.share_memory_()
        for j, s in enumerate(samples):
            if f == "feature":
                out[j].copy_(torch.from_numpy(np.ascontiguousarray(s[f])))
            else:
                to_tensor(s[f], out[j])
        batch[f] = out
    batch["key"] = [s["key"] for s in samples]
    return batch


class _MixedStreams:
    """Per-worker state: one lazy stream per source and a mixer (degraded or clear side)."""

    def __init__(
        self,
        owner: MixedBatchDataset,
        sources: list[Source],
        cover: Sequence[str],
        batch_size: int,
        spec: _StreamSpec,
        salt: int,
        counter: _Counter,
        epoch: int,
    ):
        worker, n_workers = worker_id()
        g, n_g = owner.rank * n_workers + worker, owner.world_size * n_workers
        self.sources, self.spec = sources, spec
        self.mixer = _Mixer(sources, cover, batch_size)
        self.rng = _rng(owner.seed, 3, salt, epoch, owner.rank, worker)
        self.streams: dict[int, Iterator[dict[str, Any]]] = {}
        self._make = lambda i: _source_stream(
            sources[i], salt * 1000 + i, spec, owner.seed, epoch, owner.rank, worker, g, n_g, counter
        )

    def next_batch(self, labels: dict[str, int] | None) -> dict[str, Any]:
        plan = self.mixer.plan(self.rng)
        samples = []
        for i in plan:
            if i not in self.streams:
                self.streams[i] = self._make(i)
            samples.append(next(self.streams[i]))
        batch = _collate(samples, ("input", *[f for f in OPTIONAL_FIELDS if f in self.spec.require]))
        batch["source"] = [self.sources[i].name for i in plan]
        if labels is not None:
            batch["degradation"] = torch.tensor([labels[self.sources[i].degradation] for i in plan])
        return batch


class MixedBatchDataset(IterableDataset):
    """Step-based training batches; `degraded` sources mixed so every batch has every type, and
    for DA an additional `clear` side. Use through `StepLoader` (which sets the epoch)."""

    def __init__(
        self,
        sources: list[Source],
        degradations: Sequence[str],
        batch_size: int,
        spec: _StreamSpec,
        steps_per_epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        clear_sources: list[Source] | None = None,
        clear_batch_size: int | None = None,
        clear_spec: _StreamSpec | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world of size {world_size}")
        if steps_per_epoch <= 0:
            raise ConfigError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        self.degradations = list(degradations)
        if len(set(self.degradations)) != len(self.degradations) or not self.degradations:
            raise ConfigError(f"degradations must be distinct names, got {self.degradations}")
        for s in sources:
            if s.degradation not in self.degradations:
                raise ConfigError(
                    f"source {s.name}: degradation '{s.degradation}' not in {self.degradations}"
                )
        missing = [d for d in self.degradations if all(s.degradation != d for s in sources)]
        if missing:
            raise ConfigError(f"no source for degradation(s) {missing}; every batch must hold every type")
        _Mixer(sources, self.degradations, batch_size)  # validate batch size early
        self.sources, self.batch_size, self.spec = sources, batch_size, spec
        self.steps_per_epoch, self.seed, self.rank, self.world_size = steps_per_epoch, seed, rank, world_size
        self.clear_sources, self.clear_spec = clear_sources, clear_spec
        self.clear_batch_size = clear_batch_size or batch_size
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The epoch is read now, not at the first batch: without workers the DataLoader makes this
        # iterator at once, and the next epoch's may be made (set_epoch) before this one is read.
        return self._batches(self.epoch)

    def _batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        worker, n_workers = worker_id()
        # This worker's share of the rank's steps; the DataLoader round-robins over workers.
        n_batches = self.steps_per_epoch // n_workers + (worker < self.steps_per_epoch % n_workers)
        counter = _Counter()
        labels = {d: i for i, d in enumerate(self.degradations)}
        degraded = _MixedStreams(
            self, self.sources, self.degradations, self.batch_size, self.spec, 0, counter, epoch
        )
        clear = None
        if self.clear_sources is not None:
            clear = _MixedStreams(
                self, self.clear_sources, (), self.clear_batch_size, self.clear_spec, 1, counter, epoch
            )
        for _ in range(n_batches):
            batch = degraded.next_batch(labels)
            if clear is not None:
                batch = {"degraded": batch, "clear": clear.next_batch(None)}
            batch["bad_samples"] = counter.take()
            counter.put_padded(batch)
            yield batch


class StepLoader:
    """A DataLoader over a MixedBatchDataset that yields exactly `steps_per_epoch` batches per
    epoch on every rank. Each `iter()` is one epoch (epoch number advances; `set_epoch` to resume).
    Samples smaller than the crop are counted in `padding` (a CropPadding), which warns once.

    `iter()` starts the epoch's workers at once (they fill their prefetch queues before the first
    `next`), so a training loop can start the next epoch while the current one drains
    (`EpochBatches.lookahead`) and the workers' start-up and shuffle-buffer fill hide behind steps.
    """

    def __init__(
        self,
        dataset: MixedBatchDataset,
        num_workers: int,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        multiprocessing_context: str | None = None,
        padding: CropPadding | None = None,
    ):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.padding = padding if padding is not None else CropPadding()
        self.epoch = 0

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> EpochBatches:
        return EpochBatches(self)


class EpochBatches(Iterator[dict[str, Any]]):
    """One epoch of a StepLoader, its workers started on creation. `close()` stops them early."""

    def __init__(self, owner: StepLoader):
        self.owner, self.epoch, self.n = owner, owner.epoch, 0
        ds, workers = owner.dataset, owner.num_workers
        ds.epoch = self.epoch  # pickled into this epoch's workers as they start
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            pin_memory=owner.pin_memory,
            prefetch_factor=owner.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
            multiprocessing_context=owner.multiprocessing_context if workers > 0 else None,
            worker_init_fn=leave_ctrl_c_to_the_main_process,
            # The workers' base seed (unused: the data's randomness comes from seed/epoch/rank/worker)
            # is drawn from this generator, not the global RNG: when an epoch starts does not change
            # what a training step draws.
            generator=torch.Generator().manual_seed(int(_rng(ds.seed, 17, self.epoch, ds.rank).integers(2**62))),
        )
        self._it: Iterator[dict[str, Any]] | None = iter(loader)
        # Batches the workers hold ready ahead of the consumer: when this many are left, they idle.
        self.lookahead = workers * (owner.prefetch_factor or 0)

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            if self.n != len(self.owner):  # would desynchronise DDP ranks: fail loudly instead
                raise RuntimeError(f"loader yielded {self.n} batches, expected {len(self.owner)}") from None
            self.owner.epoch = max(self.owner.epoch, self.epoch + 1)
            raise
        self.n += 1
        self.owner.padding.update(batch)
        return batch

    def close(self) -> None:
        """Stop this epoch's workers now (a loop cut short would leave them to the garbage collector)."""
        it, self._it = getattr(self, "_it", None), None  # (None too when __init__ failed before it)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self) -> None:
        self.close()


def _stream_spec(
    require: Sequence[str],
    crop_size: int | None,
    cell: int,
    augment: Aug | bool,
    shuffle_buffer: int,
    bad_samples: str,
    clear_from_target: bool = False,
    shuffle_buffer_mb: float | None = None,
) -> _StreamSpec:
    if bad_samples not in ("skip", "fail"):
        raise ConfigError(f"bad_samples must be 'skip' or 'fail', got {bad_samples!r}")
    unknown = set(require) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ConfigError(f"unknown required field(s) {sorted(unknown)}; choose from {OPTIONAL_FIELDS}")
    if crop_size is not None and "feature" in require and crop_size % cell:
        raise ConfigError(f"crop_size {crop_size} must be a multiple of the feature cell {cell}")
    return _StreamSpec(
        tuple(require), crop_size, cell, Aug.allowed(augment), max(1, shuffle_buffer), bad_samples, clear_from_target,
        None if shuffle_buffer_mb is None else int(shuffle_buffer_mb * 2**20),
    )


def kt_loader(
    sources: Sequence[Any],
    degradations: Sequence[str],
    batch_size: int,
    crop_size: int,
    steps_per_epoch: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    cell: int = 16,
    bad_samples: BadPolicy = "skip",
    require: Sequence[str] = ("teacher", "feature"),
    augment: Aug | bool = True,
    shuffle_buffer: int = 64,
    pin_memory: bool = False,
    padding: CropPadding | None = None,
    teachers: Mapping[str, str] | None = None,
    shuffle_buffer_mb: float | None = None,
) -> StepLoader:
    """Mixed training batches for the KT stage (and, with require=('target',), the teacher stage's
    paired batches of its one degradation). `teachers` (degradation -> sha256): a cached sample whose
    json names another teacher stops the run (DataError), never trained on.

    `sources`: (name, shards, degradation, weight) tuples or Source objects. Each batch is a dict:
    'input' (B,3,crop,crop) in [-1,1], one entry per required field ('target', 'teacher' as images;
    'feature' as (B,C,crop/cell,crop/cell) float32), 'degradation' (LongTensor index into
    `degradations`), 'key', 'source' (lists of str), 'bad_samples' and 'padded_samples' (ints, see
    module doc). `padding`: a CropPadding kept over the run's epochs (the warning is given once per
    CropPadding); a fresh one when None.
    """
    srcs = make_sources(sources)
    spec = _stream_spec(require, crop_size, cell, augment, shuffle_buffer, bad_samples,
                        shuffle_buffer_mb=shuffle_buffer_mb)
    spec.teachers = tuple(sorted((teachers or {}).items()))
    ds = MixedBatchDataset(srcs, degradations, batch_size, spec, steps_per_epoch, seed, rank, world_size)
    return StepLoader(ds, num_workers, pin_memory, padding=padding)


def da_loader(
    degraded_sources: Sequence[Any],
    clear_sources: Sequence[Any],
    degradations: Sequence[str],
    batch_size: int,
    crop_size: int,
    steps_per_epoch: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    clear_batch_size: int | None = None,
    bad_samples: BadPolicy = "skip",
    augment: Aug | bool = True,
    shuffle_buffer: int = 64,
    pin_memory: bool = False,
    padding: CropPadding | None = None,
    shuffle_buffer_mb: float | None = None,
) -> StepLoader:
    """Per step {'degraded': batch holding every type (as kt_loader, input only),
    'clear': batch of clear images, 'bad_samples': int, 'padded_samples': int (both sides)};
    `padding` as in kt_loader.

    `clear_sources`: (name, shards[, 'clear'[, weight]]) — the degradation field is ignored. A clear
    sample with a target (a synthetic or real paired set) contributes its target; one without a
    target is used only if its json says 'clear' (or says nothing).
    """
    srcs = make_sources(degraded_sources)
    clear = []
    for c in clear_sources:
        if isinstance(c, Source):
            clear.append(c)
        else:
            name, shards = c[0], c[1]
            weight = float(c[3]) if len(c) == 4 else 1.0
            clear.append(Source(str(name), tuple(resolve_shards(shards)), "clear", weight))
    clear = make_sources(clear)
    spec = _stream_spec((), crop_size, 16, augment, shuffle_buffer, bad_samples, shuffle_buffer_mb=shuffle_buffer_mb)
    cspec = _stream_spec((), crop_size, 16, augment, shuffle_buffer, bad_samples, clear_from_target=True,
                         shuffle_buffer_mb=shuffle_buffer_mb)
    ds = MixedBatchDataset(
        srcs,
        degradations,
        batch_size,
        spec,
        steps_per_epoch,
        seed,
        rank,
        world_size,
        clear_sources=clear,
        clear_batch_size=clear_batch_size,
        clear_spec=cspec,
    )
    return StepLoader(ds, num_workers, pin_memory, padding=padding)


# --------------------------------------------------------------------------------------------
# Evaluation stream
# --------------------------------------------------------------------------------------------


class EvalStream(IterableDataset):
    """Every sample of `shards` exactly once across ranks and DataLoader workers, full size.

    Order is deterministic: the shard list's order, then tar order, within each worker; the
    caller gathers results and sorts by key. `first=N` (a validation set's cap) reads only the
    set's first N samples in that order, dealt out sample by sample, so any number of processes
    and workers scores the same N images (with whole shards per rank, the first N of each rank's
    shards, the images changed with the process count). Each item: {'key', 'shard', 'meta', 'input'
    (3,H,W) in [-1,1], 'target' when present (or required)}; with bad_samples='skip' a bad
    sample yields {'key', 'shard', 'error'} instead, so the report can list it ('key' is None when a
    whole shard is unreadable). `as_tensor=False` gives HWC uint8/uint16 arrays instead.
    """

    def __init__(
        self,
        shards: ShardSpec,
        rank: int = 0,
        world_size: int = 1,
        require: Sequence[str] = (),
        bad_samples: BadPolicy = "skip",
        as_tensor: bool = True,
        first: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world of size {world_size}")
        if first is not None and first < 1:
            raise ConfigError(f"first must be at least 1, got {first}")
        if bad_samples not in ("skip", "fail"):
            raise ConfigError(f"bad_samples must be 'skip' or 'fail', got {bad_samples!r}")
        self.shards = resolve_shards(shards)
        self.rank, self.world_size = rank, world_size
        self.require, self.bad_samples, self.as_tensor = tuple(require), bad_samples, as_tensor
        self.first = first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, n_workers = worker_id()
        g, n_g = self.rank * n_workers + worker, self.world_size * n_workers
        if self.first is not None:
            yield from self._iter_first(g, n_g)
            return
        for shard_i, stride, offset in assign_shards(len(self.shards), g, n_g):
            url = self.shards[shard_i]
            last = None
            try:  # this worker's samples only: the others' are seeked past, not read
                for key, files in iter_shard(url, lambda i, stride=stride, offset=offset: i % stride == offset):
                    last = key
                    yield self._decode(url, key, files)
            except ShardReadError as exc:
                last = exc.last_key if exc.last_key is not None else last  # the last whole sample, any worker's
                if self.bad_samples == "fail":
                    raise DataError(f"shard {url} is unreadable {read_position(last)}: {exc.cause}") from exc
                yield {
                    "key": None,
                    "shard": url,
                    "error": f"shard unreadable {read_position(last)}: {exc.cause}",
                }

    def _iter_first(self, g: int, n_g: int) -> Iterator[dict[str, Any]]:
        """The set's first `self.first` samples, the i-th to global worker i % n_g. Every worker
        reads the tars up to there (cheap for a validation cap) and decodes only its own samples."""
        i = 0
        for url in self.shards:
            last = None
            try:
                for key, files in iter_shard(url):
                    last = key
                    if i % n_g == g:
                        yield self._decode(url, key, files)
                    i += 1
                    if i >= self.first:
                        return
            except ShardReadError as exc:
                if self.bad_samples == "fail":
                    raise DataError(f"shard {url} is unreadable {read_position(last)}: {exc.cause}") from exc
                if i % n_g == g:  # one worker reports it; the others go on to the next shard as it does
                    yield {"key": None, "shard": url, "error": f"shard unreadable {read_position(last)}: {exc.cause}"}

    def _decode(self, url: str, key: str, files: dict[str, bytes]) -> dict[str, Any]:
        try:
            s = decode_sample(files, self.require, ("target",))
        except BadSample as exc:
            if self.bad_samples == "fail":
                raise DataError(f"bad sample in shard {url}, key {key}: {exc}") from exc
            return {"key": key, "shard": url, "error": str(exc)}
        item: dict[str, Any] = {"key": key, "shard": url, "meta": s["meta"]}
        for f in ("input", "target"):
            if f in s:
                item[f] = to_tensor(s[f]) if self.as_tensor else np.ascontiguousarray(s[f])
        return item


def _keep(item: dict[str, Any]) -> dict[str, Any]:
    return item


def eval_samples(
    shards: ShardSpec,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    require: Sequence[str] = (),
    bad_samples: BadPolicy = "skip",
    as_tensor: bool = True,
    first: int | None = None,
) -> Iterable[dict[str, Any]]:
    """Evaluation items for this rank (see EvalStream; `first`: only the set's first N samples).
    With num_workers=0 this is a plain generator (no DataLoader); otherwise a DataLoader with
    batch_size=None over worker processes.
    """
    ds = EvalStream(shards, rank, world_size, require, bad_samples, as_tensor, first)
    if num_workers == 0:
        return ds
    return DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                      worker_init_fn=leave_ctrl_c_to_the_main_process)


def leave_ctrl_c_to_the_main_process(worker_id: int) -> None:
    """A loader worker ignores SIGINT. The terminal sends Ctrl-C to every process of the group; a
    worker it killed would make the main process's next fetch fail ("worker exited unexpectedly")
    before training could write its checkpoint. The main process ends its workers when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
