"""One unit of work, (epoch, input shard) -> committed Parquet file, with no Ray in sight.

The data path: shard -> samples -> augmented tensors -> backbone -> Arrow batches -> commit.
Decoding and the PIL augmentation steps run in a background thread while the backbone runs the
previous batch; they yield uint8 images, which the main thread turns into normalized float
tensors one batch at a time (``SplitTransform``). The background thread then runs no torch
kernels, so it never starts a second OpenMP team that would fight the forward's for the cores.
With ``decode_workers`` > 0 the thread hands decoding and augmentation to a process pool
(``pipeline.cache.decode_pool``), for GPUs that forward faster than one thread decodes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cache.augment import build_transform, sample_seed, split_transform
from pipeline.cache.backbone import Backbone, Compute, read_label_remap
from pipeline.cache.decode_pool import DecodePool, Skip, Task, prepare_image
from pipeline.cache.samples import RawSample, iter_samples
from pipeline.cache.skips import BadSample, SkipReason
from pipeline.cache.writer import commit_unit, to_record_batch, unit_path
from pipeline.prefetch import prefetch
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
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
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

    def manifest_entry(self) -> dict[str, Any]:
        """The unit's entry in ``_manifest.json``."""
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "source": self.source,
            "rows": self.rows,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


#: What a sample carries besides its image: its label and its ambiguity (NaN when unknown).
Meta = tuple[int, float]


@dataclass
class _Batch:
    keys: list[str]
    images: torch.Tensor  # uint8 (N, H, W, C) with a split transform, else the model's input
    labels: torch.Tensor
    ambiguity: np.ndarray
    prepare_seconds: float


def _skip(key: str, bad: BadSample, unit: Unit, counts: Counter) -> None:
    counts[bad.reason.value] += 1
    log.warning("skipping %s in %s: %s", key, unit.source, bad)


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
        self.transform = build_transform(settings.transform)
        self.split = split_transform(self.transform)
        self.remap = read_label_remap(settings.label_remap) if settings.label_remap else None
        embedding_type = pa.float16() if settings.dtype == "float16" else pa.float32()
        self.schema = with_provenance(
            cache_schema(settings.embedding_dim, embedding_type), settings.provenance
        )
        workers = settings.decode_workers or 0
        self.decode_pool = DecodePool(settings.transform, workers) if workers else None

    def close(self) -> None:
        """Stop the decode workers, if any. The runner cannot run units afterwards."""
        if self.decode_pool is not None:
            self.decode_pool.close()
            self.decode_pool = None

    def head_label(self, sample: RawSample) -> int:
        """The sample's label in the cache's label space: its own in the dataset's space; in
        the classifier's, remapped and checked to be a class of the head (else ``BadSample``)."""
        label = sample.label
        if self.settings.label_space == "dataset":
            return label
        if self.remap is not None:
            label = int(self.remap[label]) if 0 <= label < len(self.remap) else -1
        if not 0 <= label < self.backbone.num_classes:
            raise BadSample(
                SkipReason.LABEL_OUTSIDE_HEAD,
                f"label {sample.label} is not a class of the {self.backbone.num_classes}-way head",
                sample.key,
            )
        return label

    def _labelled(self, unit: Unit, counts: Counter) -> Iterator[tuple[Task, Meta]]:
        """The unit's samples with a label in the cache's space, each as a decode task and its
        label and ambiguity."""
        samples = iter_samples(
            unit.source,
            image_keys=self.settings.image_keys,
            label_key=self.settings.label_key,
            ambiguity_key=self.settings.ambiguity_key,
            counts=counts,
        )
        for sample in samples:
            try:
                label = self.head_label(sample)
            except BadSample as bad:
                _skip(sample.key, bad, unit, counts)
                continue
            seed = sample_seed(self.settings.seed, unit.epoch, sample.key)
            ambiguity = np.nan if sample.ambiguity is None else sample.ambiguity
            yield (sample.key, sample.image, seed), (label, ambiguity)

    def _tensors(self, unit: Unit, counts: Counter) -> Iterator[tuple[str, Any, Meta]]:
        if self.decode_pool is not None:
            yield from self._pooled_tensors(unit, counts, self.decode_pool)
            return
        for (key, data, seed), meta in self._labelled(unit, counts):
            try:
                yield key, prepare_image(self.transform, self.split, data, key, seed), meta
            except BadSample as bad:
                _skip(key, bad, unit, counts)

    def _pooled_tensors(
        self, unit: Unit, counts: Counter, pool: DecodePool
    ) -> Iterator[tuple[str, Any, Meta]]:
        handed: deque[tuple[str, Meta]] = deque()  # (key, meta) of each task, in pool order

        def tasks() -> Iterator[Task]:
            for task, meta in self._labelled(unit, counts):
                handed.append((task[0], meta))
                yield task

        for image in pool.map(tasks()):
            key, meta = handed.popleft()
            if isinstance(image, Skip):
                _skip(key, image.error(), unit, counts)
            else:
                yield key, image, meta

    def _batches(self, unit: Unit, counts: Counter) -> Iterator[_Batch]:
        batch: list[tuple[str, Any, Meta]] = []
        started = time.perf_counter()
        for item in self._tensors(unit, counts):
            batch.append(item)
            if len(batch) == self.settings.batch_size:
                yield self._collate(batch, time.perf_counter() - started)
                batch, started = [], time.perf_counter()
        if batch:
            yield self._collate(batch, time.perf_counter() - started)

    @staticmethod
    def _collate(batch: list[tuple[str, Any, Meta]], seconds: float) -> _Batch:
        keys, images, metas = zip(*batch, strict=True)
        labels, ambiguity = zip(*metas, strict=True)
        if isinstance(images[0], np.ndarray):
            stacked = torch.from_numpy(np.stack(images))
        else:
            stacked = torch.stack(images)
        return _Batch(
            list(keys), stacked, torch.tensor(labels), np.array(ambiguity, np.float32), seconds
        )

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input for a collated batch: uint8 images are normalized here, on the
        backbone's device."""
        if self.split is None:
            return images
        return self.split.to_tensor(images.to(self.backbone.device, non_blocking=True))

    def run(self, unit: Unit) -> UnitResult:
        """Compute and commit ``unit``; returns its rows, bytes, skips and stage timings."""
        started, cpu_started = time.perf_counter(), time.process_time()
        counts: Counter = Counter()
        timings = {"prepare": 0.0, "forward": 0.0, "wait": 0.0, "write": 0.0}
        record_batches: list[pa.RecordBatch] = []
        waited = time.perf_counter()
        for batch in prefetch(self._batches(unit, counts), self.settings.prefetch_batches):
            timings["wait"] += time.perf_counter() - waited
            timings["prepare"] += batch.prepare_seconds
            tick = time.perf_counter()
            labels = batch.labels if self.settings.label_space == "classifier" else None
            outputs = self.backbone.forward(self._model_input(batch.images), labels)
            timings["forward"] += time.perf_counter() - tick
            record_batches.append(
                to_record_batch(
                    self.schema,
                    keys=batch.keys,
                    shard=unit.shard,
                    epoch=unit.epoch,
                    labels=batch.labels.numpy(),
                    outputs={name: value.numpy() for name, value in outputs.items()},
                    ambiguity=batch.ambiguity,
                )
            )
            waited = time.perf_counter()
        rows = sum(batch.num_rows for batch in record_batches)
        skipped = {reason: count for reason, count in sorted(counts.items()) if count}
        stats = {
            "epoch": unit.epoch,
            "shard": unit.shard,
            "source": unit.source,
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
        timings["cpu"] = time.process_time() - cpu_started  # all threads of this process
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
        )
