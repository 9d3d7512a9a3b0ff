"""One unit of work, (epoch, input shard) -> committed Parquet file, with no Ray in sight.

The data path: shard -> samples -> augmented tensors -> backbone -> Arrow batches -> commit.
Decoding and the PIL augmentation steps run in a background thread while the backbone runs the
previous batch; they yield uint8 images, which the main thread turns into normalized float
tensors one batch at a time (``SplitTransform``). The background thread then runs no torch
kernels, so it never starts a second OpenMP team that would fight the forward's for the cores.
With ``decode_workers`` > 0 the thread hands decoding and augmentation to a process pool
(``pipeline.cache.decode_pool``), for GPUs that forward faster than one thread decodes. With
``--decode device`` it decodes and augments chunks of samples on the backbone's device instead
(``pipeline.cache.device_decode``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cache.augment import sample_seed
from pipeline.cache.backbone import Backbone, Compute
from pipeline.cache.decode_pool import (
    DecodePool,
    Prepare,
    Skip,
    Task,
    build_prepare,
    prepare_images,
)
from pipeline.cache.device_decode import DeviceDecoder
from pipeline.cache.samples import IMAGE_KEYS, RawSample, iter_samples
from pipeline.cache.skips import BadSample, SkipReason
from pipeline.cache.writer import commit_unit, to_record_batch, unit_path
from pipeline.dataset.remap import read_label_remap
from pipeline.prefetch import clear_frames, prefetch
from schemas import cache_schema, with_provenance

log = logging.getLogger(__name__)


class UnitSettings(BaseModel):
    """Everything a worker needs that is the same for every unit of one cache job."""

    model_config = ConfigDict(frozen=True)

    output: str
    seed: int
    batch_size: int
    transform: dict[str, Any]
    provenance: dict[str, Any]
    embedding_dim: int
    #: Where and how the backbone must run: the provenance records it, the runner checks it.
    compute: Compute = Compute()
    dtype: str = "float16"
    image_keys: tuple[str, ...] = IMAGE_KEYS
    label_key: str = "cls"
    label_remap: str | None = None
    #: ``classifier``: labels remapped into the classifier's classes, loss against them;
    #: ``dataset``: every sample keeps its own label, no loss (docs/design.md 3.2).
    label_space: Literal["classifier", "dataset"] = "classifier"
    ambiguity_key: str | None = None
    prefetch_batches: int = 2
    #: Processes that decode and augment; 0 does it in the background thread. None lets the
    #: Ray actor choose (``pipeline.cache.distribute``); a ``UnitRunner`` treats None as 0.
    decode_workers: int | None = Field(default=0, ge=0)


@dataclass(frozen=True)
class Unit:
    """One input shard in one epoch: the smallest piece of work that is committed on its own."""

    source: str
    shard: str
    epoch: int
    #: The shard's size in bytes when the run started, if its listing gave it: recorded with
    #: the unit, so a later run finds a shard rebuilt under the same URL.
    source_bytes: int | None = None

    @property
    def relpath(self) -> str:
        """The unit file's path relative to the cache root."""
        return unit_path(self.epoch, self.shard)


@dataclass
class UnitResult:
    """What a finished unit reports to the driver and the manifest."""

    relpath: str
    epoch: int
    shard: str
    source: str
    rows: int
    bytes: int
    skipped: dict[str, int]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    source_bytes: int | None = None
    #: Which target of a one-pass run (``Fanout``) this is the unit of: its runner's index.
    target: int = 0

    def manifest_entry(self) -> dict[str, Any]:
        """The unit's entry in ``_manifest.json``."""
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "source": self.source,
            **_source_bytes(self.source_bytes),
            "rows": self.rows,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def _source_bytes(size: int | None) -> dict[str, int]:
    """The ``source_bytes`` field of a unit's record: absent where the shard's size is unknown."""
    return {} if size is None else {"source_bytes": size}


#: What a sample carries besides its image: its label and its ambiguity (NaN when unknown).
Meta = tuple[int, float]


@dataclass
class _Batch:
    keys: list[str]
    images: torch.Tensor  # uint8 (N, H, W, C) with a split transform, else the model's input
    labels: torch.Tensor
    ambiguity: np.ndarray
    prepare_seconds: float
    prepare_cpu: float  # CPU seconds of the preparing thread (not of decode workers)


def _skip(key: str, bad: BadSample, unit: Unit, counts: Counter, *, said: bool = False) -> None:
    """Count a skipped sample; name the first of its kind in the unit of epoch 0 (the others
    at debug level: a class the head lacks can skip thousands of samples per unit, and each
    later epoch skips the same ones), unless another target ``said`` it already."""
    counts[bad.reason.value] += 1
    if said:
        return
    first = counts[bad.reason.value] == 1 and unit.epoch == 0
    log.log(
        logging.WARNING if first else logging.DEBUG,
        *("skipping %s in %s: %s", key, unit.source, bad.why),
    )


def _log_skips(unit: Unit, counts: Counter, said: set[tuple[str, int]]) -> None:
    """One line per kind of skip of which ``unit`` (of epoch 0) had more than the one named,
    unless another target's counts ``said`` the same."""
    if unit.epoch:
        return
    for reason, count in sorted(counts.items()):
        if count > 1 and (reason, count) not in said:
            said.add((reason, count))
            log.warning(
                "%s: %d samples skipped as %s (the first named above)", unit.source, count, reason
            )


class UnitRunner:
    """Turns units into committed Parquet files with one backbone, loaded once."""

    def __init__(self, backbone: Backbone, settings: UnitSettings) -> None:
        if backbone.compute != settings.compute:
            raise ValueError(
                f"the backbone runs as {backbone.compute}, but this cache is computed as "
                f"{settings.compute}: its units would carry the wrong provenance"
            )
        self.backbone = backbone
        self.settings = settings
        self.split = build_prepare(settings.transform)[1]
        self.remap = read_label_remap(settings.label_remap) if settings.label_remap else None
        embedding_type = pa.float16() if settings.dtype == "float16" else pa.float32()
        self.schema = with_provenance(
            cache_schema(settings.embedding_dim, embedding_type), settings.provenance
        )
        self._fanout: Fanout | None = Fanout([self], settings.decode_workers or 0)

    @property
    def decode_pool(self) -> DecodePool | None:
        """The runner's decode processes, if it has any."""
        return None if self._fanout is None else self._fanout.pool

    def close(self) -> None:
        """Stop the decode workers, if any. The runner cannot run units afterwards."""
        if self._fanout is not None:
            self._fanout.close()
            self._fanout = None

    def head_label(self, sample: RawSample) -> int:
        """The sample's label in the cache's label space: its own in the dataset's space; in
        the classifier's, remapped and checked to be a class of the head (else ``BadSample``)."""
        label = sample.label
        if self.settings.label_space == "dataset":
            return label
        if self.remap is not None:
            label = int(self.remap[label]) if 0 <= label < len(self.remap) else -1
            if label < 0:  # the shard label may well be below the head's class count
                raise BadSample(
                    SkipReason.LABEL_OUTSIDE_HEAD,
                    f"label {sample.label} maps to no class of the head by --label-remap "
                    + (
                        "(-1 there)"
                        if sample.label < len(self.remap)
                        else f"(it maps labels 0 to {len(self.remap) - 1})"
                    ),
                    sample.key,
                )
        if not 0 <= label < self.backbone.num_classes:
            raise BadSample(
                SkipReason.LABEL_OUTSIDE_HEAD,
                f"label {sample.label} is not a class of the {self.backbone.num_classes}-way head",
                sample.key,
            )
        return label

    @staticmethod
    def _collate(batch: list[tuple[str, Any, Meta]], seconds: float, cpu: float) -> _Batch:
        keys, images, metas = zip(*batch, strict=True)
        labels, ambiguity = zip(*metas, strict=True)
        if isinstance(images[0], np.ndarray):
            stacked = torch.from_numpy(np.stack(images))
        else:
            stacked = torch.stack(images)
        labels_tensor, ambiguity_array = torch.tensor(labels), np.array(ambiguity, np.float32)
        return _Batch(list(keys), stacked, labels_tensor, ambiguity_array, seconds, cpu)

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input for a collated batch: uint8 images are normalized here, on the
        backbone's device."""
        if self.split is None:
            return images
        return self.split.to_tensor(images.to(self.backbone.device, non_blocking=True))

    def _record(self, batch: _Batch, unit: Unit) -> pa.RecordBatch:
        """The batch's rows: the backbone's forward, as Arrow."""
        labels = batch.labels if self.settings.label_space == "classifier" else None
        outputs = self.backbone.forward(self._model_input(batch.images), labels)
        return to_record_batch(
            self.schema,
            keys=batch.keys,
            shard=unit.shard,
            epoch=unit.epoch,
            labels=batch.labels.numpy(),
            outputs={name: value.numpy() for name, value in outputs.items()},
            ambiguity=batch.ambiguity,
        )

    def _commit(
        self,
        unit: Unit,
        record_batches: list[pa.RecordBatch],
        counts: Counter,
        started: float,
        timings: dict[str, float],
    ) -> UnitResult:
        """Write the unit's file and report it."""
        rows = sum(batch.num_rows for batch in record_batches)
        skipped = {reason: count for reason, count in sorted(counts.items()) if count}
        stats = {
            "epoch": unit.epoch,
            "shard": unit.shard,
            "source": unit.source,
            **_source_bytes(unit.source_bytes),
            "rows": rows,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 3),
        }
        tick = time.perf_counter()
        size = commit_unit(
            record_batches,
            self.schema,
            root=self.settings.output,
            relpath=unit.relpath,
            stats=stats,
        )
        timings["write"] = time.perf_counter() - tick
        return UnitResult(
            relpath=unit.relpath,
            epoch=unit.epoch,
            shard=unit.shard,
            source=unit.source,
            rows=rows,
            bytes=size,
            skipped=skipped,
            seconds=time.perf_counter() - started,
            timings=timings,
            source_bytes=unit.source_bytes,
        )

    def run(self, unit: Unit) -> UnitResult:
        """Compute and commit ``unit``; returns its rows, bytes, skips and stage timings."""
        if self._fanout is None:
            raise RuntimeError("the runner is closed")
        (result,) = self._fanout.run(unit).values()
        if isinstance(result, Exception):
            raise result
        return result


@dataclass
class _UnitPass:
    """One unit's pass for some of a :class:`Fanout`'s targets: the ``active`` ones (runner
    indices), the skips counted for all (``shared``) and for each target (``own``), and the
    targets whose forward has ``failed`` (index -> error), which the producer reads as it grows."""

    unit: Unit
    active: Collection[int]
    own: list[Counter]
    shared: Counter = field(default_factory=Counter)
    failed: dict[int, Exception] = field(default_factory=dict)


class Fanout:
    """Runs each unit for several targets (each a ``UnitRunner``: a backbone and its cache)
    from one read and one decode of every sample, one augmentation per distinct transform.

    Each target sees exactly the rows, batches and skips a run of its own would: its own label
    filter, its batches cut from its own rows in shard order, its own file. The targets must
    share what picks and seeds the samples (seed, image/label/ambiguity keys). A target whose
    forward fails fails alone: the unit is committed for the others (:meth:`run`).
    """

    SHARED = ("seed", "image_keys", "label_key", "ambiguity_key", "prefetch_batches")

    def __init__(self, runners: list[UnitRunner], decode_workers: int) -> None:
        first = runners[0].settings
        for runner in runners[1:]:
            for name in self.SHARED:
                if getattr(runner.settings, name) != getattr(first, name):
                    raise ValueError(f"targets of one pass must share {name}")
        distinct: dict[str, dict[str, Any]] = {}
        for runner in runners:
            distinct.setdefault(_augmentation(runner), runner.settings.transform)
        order = list(distinct)
        self.runners = runners
        self.settings = first
        self.transform_of = [order.index(_augmentation(runner)) for runner in runners]
        resolved = list(distinct.values())
        on_device = {one.get("decode") == "device" for one in resolved}
        if len(on_device) > 1:
            raise ValueError("targets of one pass must share --decode")
        if decode_workers and True in on_device:
            raise ValueError("--decode device decodes on the backbone's device: no decode workers")
        self.on_device = (
            DeviceDecoder(resolved, runners[0].backbone.device) if True in on_device else None
        )
        self.prepares = [] if self.on_device else [build_prepare(one) for one in resolved]
        self.pool = DecodePool(resolved, decode_workers) if decode_workers else None

    def close(self) -> None:
        """Stop the decode workers, if any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _labelled(self, run: _UnitPass) -> Iterator[tuple[Task, list[Meta | None]]]:
        """The unit's samples some ``run.active`` target keeps, each as a decode task and, per
        target, its label and ambiguity (None where the target skips the sample, is not
        active or has failed: ``run.failed``, read as it grows)."""
        unit = run.unit
        samples = iter_samples(
            unit.source,
            image_keys=self.settings.image_keys,
            label_key=self.settings.label_key,
            ambiguity_key=self.settings.ambiguity_key,
            counts=run.shared,
            name_skips=unit.epoch == 0,
            source_bytes=unit.source_bytes,
        )
        seen, with_ambiguity = 0, 0
        for sample in samples:
            seen += 1
            with_ambiguity += sample.ambiguity is not None
            ambiguity = np.nan if sample.ambiguity is None else sample.ambiguity
            metas: list[Meta | None] = []
            for target, (runner, counts) in enumerate(zip(self.runners, run.own, strict=True)):
                if target not in run.active or target in run.failed:
                    metas.append(None)
                    continue
                try:
                    metas.append((runner.head_label(sample), ambiguity))
                except BadSample as bad:
                    _skip(sample.key, bad, unit, counts)
                    metas.append(None)
            if any(meta is not None for meta in metas):
                seed = sample_seed(self.settings.seed, unit.epoch, sample.key)
                yield (sample.key, sample.image, seed), metas
        key = self.settings.ambiguity_key
        if key is not None and seen and not with_ambiguity and unit.epoch == 0:
            log.warning(
                "%s: none of its %d sample(s) has a readable %r member (--ambiguity-key), so "
                "their ambiguity is null: is the key right? (the key is part of the cache's "
                "settings; another one makes another cache)",
                *(unit.source, seen, key),
            )

    def _prepared(self, run: _UnitPass) -> Iterator[tuple[str, list[Any], list[Meta | None]]]:
        """Each kept sample's key, its image per distinct transform and its metas."""
        labelled = self._labelled(run)
        if self.on_device is not None:
            results = _prepared_on(self.on_device, labelled, self.settings.batch_size)
        elif self.pool is None:
            results = ((task, metas, _try_prepare(self.prepares, task)) for task, metas in labelled)
        else:
            handed: deque[tuple[Task, list[Meta | None]]] = deque()

            def tasks() -> Iterator[Task]:
                for task, metas in labelled:
                    handed.append((task, metas))
                    yield task

            results = ((*handed.popleft(), images) for images in self.pool.map(tasks()))
        for (key, _, _), metas, images in results:
            if isinstance(images, Skip):  # the same for every target: named once
                keeping = [c for meta, c in zip(metas, run.own, strict=True) if meta is not None]
                for place, counts in enumerate(keeping):
                    _skip(key, images.error(), run.unit, counts, said=place > 0)
            else:
                yield key, images, metas

    def _batches(self, run: _UnitPass) -> Iterator[tuple[int, _Batch]]:
        """(target, batch) pairs: each target's rows cut into its own batches, in order; none
        of a target from when it is in ``run.failed`` (give or take the batches prefetched).

        A batch's seconds are those spent preparing since the previous batch was handed on,
        not the wait for the consumer to take it (the prefetch queue's room)."""
        pending: list[list[tuple[str, Any, Meta]]] = [[] for _ in self.runners]
        started, cpu = time.perf_counter(), time.thread_time()

        def collate(target: int) -> _Batch:
            batch = UnitRunner._collate(
                pending[target], time.perf_counter() - started, time.thread_time() - cpu
            )
            pending[target] = []
            return batch

        for key, images, metas in self._prepared(run):
            for target, meta in enumerate(metas):
                if meta is None:
                    continue
                pending[target].append((key, images[self.transform_of[target]], meta))
                if len(pending[target]) == self.runners[target].settings.batch_size:
                    yield target, collate(target)
                    started, cpu = time.perf_counter(), time.thread_time()
        for target in range(len(self.runners)):
            if pending[target]:
                yield target, collate(target)
                started, cpu = time.perf_counter(), time.thread_time()

    def run(
        self, unit: Unit, targets: Collection[int] | None = None
    ) -> dict[int, UnitResult | Exception]:
        """Compute and commit ``unit`` for ``targets`` (runner indices; by default every one):
        per target, in order, its result or the error its forward raised.

        A target whose forward raises (an error, the device out of memory) gets no more
        batches and no file; the others go on and are committed as they would be without it.
        An error of what the targets share (reading, decoding) or of a write is raised.
        Stages decoding and augmentation share (prepare, wait, cpu) are reported on the first
        committed result; forward and write on each target's own."""
        active = range(len(self.runners)) if targets is None else sorted(set(targets))
        started, cpu_started = time.perf_counter(), time.process_time()
        run = _UnitPass(unit, active, own=[Counter() for _ in self.runners])
        shared, own, failed = run.shared, run.own, run.failed
        timings = [{"forward": 0.0, "write": 0.0} for _ in self.runners]
        together = {"prepare": 0.0, "prepare_cpu": 0.0, "wait": 0.0}
        record_batches: list[list[pa.RecordBatch]] = [[] for _ in self.runners]
        waited = time.perf_counter()
        # the producer reads ``failed`` as it grows: a failed target's samples are no longer
        # labelled and batched for it
        batches = prefetch(self._batches(run), self.settings.prefetch_batches)
        # closed however the loop ends: a failed unit's decoding stops with it, not when its
        # traceback is freed (meanwhile drawing from torch's global RNG beside the next unit)
        with contextlib.closing(batches):
            for target, batch in batches:
                together["wait"] += time.perf_counter() - waited
                together["prepare"] += batch.prepare_seconds
                together["prepare_cpu"] += batch.prepare_cpu
                if target not in failed:
                    tick = time.perf_counter()
                    try:
                        record_batches[target].append(self.runners[target]._record(batch, unit))
                    except Exception as error:  # this target's alone: the others go on
                        failed[target] = self._named(target, _frameless(error))
                        record_batches[target] = []
                        if len(failed) == len(active):
                            break
                    timings[target]["forward"] += time.perf_counter() - tick
                waited = time.perf_counter()
        said: set[tuple[str, int]] = set()
        for counts in (shared, *(own[target] for target in active)):
            _log_skips(unit, counts, said)
        outcomes: dict[int, UnitResult | Exception] = {}
        for target in active:
            if target in failed:
                outcomes[target] = failed[target]
                continue
            if not any(isinstance(done, UnitResult) for done in outcomes.values()):
                timings[target].update(together)
            rows, counts = record_batches[target], shared + own[target]
            result = self.runners[target]._commit(unit, rows, counts, started, timings[target])
            result.target = target
            outcomes[target] = result
        first = next((done for done in outcomes.values() if isinstance(done, UnitResult)), None)
        if first is not None:
            first.timings["cpu"] = time.process_time() - cpu_started  # all threads
        return outcomes

    def _named(self, target: int, error: Exception) -> Exception:
        """``error``, noted with the backbone and cache of ``target`` where there are several."""
        if len(self.runners) > 1:
            settings = self.runners[target].settings
            backbone = settings.provenance.get("backbone")
            error.add_note(f"backbone {backbone}, cache {settings.output}")
        return error


def _frameless(error: Exception) -> Exception:
    """``error``, its traceback's frames cleared and this one (the running unit's) left out:
    kept until the unit ends, they would hold the failed forward's batch and activations (on
    a GPU out of memory, what the other backbones need). The traceback still names each file
    and line; Ray, pickling the error back to the driver, drops it anyway."""
    clear_frames(error)
    if error.__traceback__ is not None:
        error.__traceback__ = error.__traceback__.tb_next
    return error


def _augmentation(runner: UnitRunner) -> str:
    """What a target's per-image preparation depends on: its whole transform, less the
    normalization (mean, std) where the transform splits, as each target then normalizes its
    own uint8 batches (pvu's transforms use mean and std in ``Normalize`` only)."""
    resolved = runner.settings.transform
    if runner.split is not None:
        resolved = {name: value for name, value in resolved.items() if name not in ("mean", "std")}
    return json.dumps(resolved, sort_keys=True)


def _prepared_on(
    decoder: DeviceDecoder, labelled: Iterator[tuple[Task, list[Meta | None]]], chunk: int
) -> Iterator[tuple[Task, list[Meta | None], list[Any] | Skip]]:
    """``labelled`` prepared by ``decoder``, ``chunk`` samples at a time."""
    while pairs := list(itertools.islice(labelled, chunk)):
        prepared = decoder.prepare([task for task, _ in pairs])
        for (task, metas), images in zip(pairs, prepared, strict=True):
            yield task, metas, images


def _try_prepare(prepares: list[Prepare], task: Task) -> list[Any] | Skip:
    key, data, seed = task
    try:
        return prepare_images(prepares, data, key, seed)
    except BadSample as bad:
        return Skip(bad.reason, bad.key or key, bad.detail)
