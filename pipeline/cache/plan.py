"""Plan a cache job before anything is spent: rows, bytes and actor-hours from a measured sample.

Rows: the first few hundred samples of a few shards spread through the list are read; shards
read to the end are counted exactly, the others estimated from their size at the sample's
samples per byte, times the fraction of sampled samples the cache keeps (the rest are skipped,
by the same checks).
Bytes and speed: the sample really runs through ``UnitRunner`` (decode, augment, forward,
Parquet commit) into a scratch folder; rewriting its rows, and half of them, as the cache
writes them gives the bytes per row and per file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from webdataset.tariterators import base_plus_ext

from pipeline.cache.backbone import Backbone
from pipeline.cache.samples import (
    FOREIGN_HEAD_BYTES,
    METADATA_MEMBER,
    EndRecordingTarInfo,
    NoTarHeader,
    is_safe_name,
    not_a_tar,
    tar_end_damage,
)
from pipeline.cache.shards import listed_sizes
from pipeline.cache.unit import Unit, UnitResult, UnitRunner, UnitSettings
from pipeline.cache.writer import PARQUET_OPTIONS

log = logging.getLogger(__name__)

#: A sample as a shard stores it: its key, and its members' (name, bytes) in order.
Sample = tuple[str, list[tuple[str, bytes]]]
RATE_BATCHES = 5
#: The loggers that warn of a shard's samples as a unit reads them.
_READERS = [logging.getLogger(f"pipeline.cache.{name}") for name in ("samples", "unit")]
#: Shards the sample is spread over (evenly spaced through the list).
SAMPLE_SHARDS = 8
#: Bytes after a tar's last member: two zero blocks padded to a 10 KiB record, half of one on
#: average.
TAR_END = 2 * 512 + tarfile.RECORDSIZE // 2


@dataclass(frozen=True)
class ShardPrefix:
    """The first samples of a shard and the bytes they take; ``complete``: the whole shard."""

    samples: list[Sample]
    bytes: int
    complete: bool


@dataclass(frozen=True)
class Measurement:
    """One sample run through the real unit code on this machine."""

    samples: int
    result: UnitResult
    kept_per_shard: dict[str, int]  # rows the sampled samples of each shard gave
    unit_file_bytes: float  # a unit file's fixed bytes (footer, metadata, column chunks)
    bytes_per_row: float

    @property
    def kept(self) -> float:
        """Fraction of samples that become rows (a key another sampled shard holds first is
        one row, as in the cache)."""
        return sum(self.kept_per_shard.values()) / self.samples if self.samples else 0.0

    @property
    def images_per_second(self) -> float:
        """The unit's rows per wall-clock second (decode and augment overlap the forward)."""
        return self.result.rows / self.result.seconds if self.result.seconds else 0.0

    @property
    def cpu_seconds_per_image(self) -> float:
        """CPU seconds (all threads) per row: the work, whatever else runs on the machine."""
        return self.result.timings.get("cpu", 0.0) / max(self.result.rows, 1)

    @property
    def prepare_cpu_seconds_per_image(self) -> float:
        """Decode + augment CPU seconds per row, of the preparing thread."""
        return self.result.timings.get("prepare_cpu", 0.0) / max(self.result.rows, 1)

    @property
    def prepare_seconds_per_image(self) -> float:
        """Decode + augment seconds per row, on one thread."""
        return self.result.timings.get("prepare", 0.0) / max(self.result.rows, 1)


@dataclass(frozen=True)
class Estimate:
    """What a cache job will produce; ``units_done``: units the output already holds."""

    shards: int
    epochs: int
    samples: int  # per epoch, estimated
    counted_shards: int  # shards whose samples were counted, not estimated
    rows: int  # to compute, over the units still to do
    bytes: int
    units: int
    units_done: int


def read_prefix(url: str, max_samples: int, size: int) -> ShardPrefix:
    """The first ``max_samples`` samples of the ``size``-byte tar at ``url``, as stored: each a
    run of regular members next to each other with one WebDataset key, names and bytes in
    order, so that the cache's reader groups and skips them as it does the shard."""
    samples: list[Sample] = []
    damage = None
    no_tar: NoTarHeader | None = None
    with fsspec.open(url, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*", tarinfo=EndRecordingTarInfo) as tar:
                for info in tar:
                    key, _ = base_plus_ext(info.name)
                    if not info.isreg() or key is None or METADATA_MEMBER.match(info.name):
                        continue
                    if not samples or key != samples[-1][0]:
                        if len(samples) == max_samples:
                            # the stored bytes read: a tar's offset, a compressed one's far less
                            read = min(info.offset, handle.tell())
                            return ShardPrefix(samples, read, complete=False)
                        samples.append((key, []))
                    member = tar.extractfile(info)
                    samples[-1][1].append((info.name, member.read() if member else b""))
                    tar.members = []
                damage = tar_end_damage(tar)
        except NoTarHeader as error:
            no_tar = error
        except (tarfile.TarError, EOFError, zlib.error) as error:
            damage = f"{type(error).__name__}: {error}"
    if no_tar:  # a zstd file or a JPEG, say, named as the cache names it
        with fsspec.open(url, "rb") as handle:
            damage = not_a_tar(handle.read(FOREIGN_HEAD_BYTES), no_tar)
    if damage:  # the samples before it are what the cache reads
        log.warning(
            "%s: %s, after %d sample(s): pvu cache reads those and names the shard as cut short",
            *(url, damage, len(samples)),
        )
    return ShardPrefix(samples, size, complete=True)


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Bytes of each shard, one listing per folder (a couple of calls for 2,000 shards on S3);
    a shard its folder's listing lacks (or gives as empty) is asked for alone."""
    listed = listed_sizes(urls)
    return {url: listed.get(url) or int(fsspec.core.url_to_fs(url)[0].size(url)) for url in urls}


def sample_shards(sizes: dict[str, int], max_samples: int) -> dict[str, ShardPrefix]:
    """Prefixes of up to ``SAMPLE_SHARDS`` evenly spaced shards, ``max_samples`` samples in
    all; budget left by shards that end early goes to the next shards in order. In the run's
    shard order, which decides the copy of a key repeated across shards that the cache keeps."""
    urls = list(sizes)
    step = max(1, len(urls) / SAMPLE_SHARDS)
    spread = list(dict.fromkeys(urls[int(i * step)] for i in range(min(len(urls), SAMPLE_SHARDS))))
    prefixes: dict[str, ShardPrefix] = {}
    left = max_samples
    for index, url in enumerate(spread):
        if left <= 0:
            break
        prefix = read_prefix(url, -(-left // (len(spread) - index)), sizes[url])
        prefixes[url] = prefix
        left -= len(prefix.samples)
    for url in urls:
        if left <= 0:
            break
        if url not in prefixes:
            prefixes[url] = read_prefix(url, left, sizes[url])
            left -= len(prefixes[url].samples)
    return {url: prefixes[url] for url in urls if url in prefixes}


def measure(
    backbone: Backbone, settings: UnitSettings, prefixes: dict[str, ShardPrefix]
) -> Measurement:
    """Run the sampled shard prefixes, as one shard, through the cache's unit code into a
    scratch folder; count the rows each shard's samples gave and fit the file's bytes."""
    numbered = list(enumerate(prefixes.items()))
    urls = list(prefixes)
    samples = [sample for _, (_, prefix) in numbered for sample in prefix.samples]
    with (
        tempfile.TemporaryDirectory(prefix="pvu-plan-") as scratch,
        # closed however measuring ends (a warm-up forward that fails too): its decode
        # workers and their shared memory go with the error, not when its traceback is freed
        contextlib.closing(
            UnitRunner(backbone, settings.model_copy(update={"output": f"{scratch}/cache"}))
        ) as runner,
    ):
        batch = torch.zeros(settings.batch_size, *settings.transform["input_size"])
        backbone.forward(batch, torch.zeros(settings.batch_size, dtype=torch.long))  # warm up
        sample = _write_sample(f"{scratch}/sample.tar", numbered)
        names = _ShardNames(sample, urls)
        for logger in _READERS:
            logger.addFilter(names)
        try:
            result = runner.run(Unit(sample, "sample", 0))
            table = pq.read_table(f"{scratch}/cache/{result.relpath}")
        finally:
            for logger in _READERS:
                logger.removeFilter(names)
    kept = dict.fromkeys(urls, 0)
    seen: set[str] = set()
    for key in table.column("key").to_pylist():  # "<i>/<key>"; the cache keeps a first copy
        shard, name = key.split("/", 1)
        if name not in seen:
            seen.add(name)
            kept[urls[int(shard)]] += 1
    fixed, per_row = parquet_cost(table)
    return Measurement(len(samples), result, kept, fixed, per_row)


#: The ``i/`` before a key of the sample: digits and a slash that start a word (in a path such
#: as the sample's own, digits follow a slash or a letter).
_SAMPLE_KEY = re.compile(r"(?<![\w/.-])(\d+)/")


class _ShardNames(logging.Filter):
    """Names the user's shard and key in a reader's warning about the plan's sample, not the
    scratch tar and its ``i/`` names."""

    def __init__(self, sample: str, urls: list[str]) -> None:
        super().__init__()
        self.sample, self.urls = sample, urls

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.sample in message:
            key = _SAMPLE_KEY.search(message)  # the first key the warning names
            shard = self.urls[int(key[1])] if key else "the shards pvu plan sampled"
            record.msg, record.args = _SAMPLE_KEY.sub("", message).replace(self.sample, shard), ()
        return True


def _write_sample(path: str, numbered: list[tuple[int, tuple[str, ShardPrefix]]]) -> str:
    """One tar of the shards' sampled members, in order; shard ``i``'s names under ``i/``, so
    each row's key tells its shard. A name the reader refuses (absolute, ``..``) is kept as it
    is: under ``i/`` it would pass."""
    with open(path, "wb") as file, tarfile.open(fileobj=file, mode="w|") as tar:
        for i, (_, prefix) in numbered:
            for _, members in prefix.samples:
                for name, data in members:
                    info = tarfile.TarInfo(f"{i}/{name}" if is_safe_name(name) else name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def parquet_cost(table: pa.Table) -> tuple[float, float]:
    """(fixed bytes, bytes per row) of unit files like ``table``: the line through the sizes
    of its rows and of half of them, written as the cache writes them."""

    def size(rows: int) -> int:
        buffer = pa.BufferOutputStream()
        pq.write_table(table.slice(0, rows), buffer, **PARQUET_OPTIONS)
        return buffer.getvalue().size

    full, half = table.num_rows, table.num_rows // 2
    per_row = (size(full) - size(half)) / (full - half) if full > half else 0.0
    return size(full) - per_row * full, per_row


def forward_rate(backbone: Backbone, input_size: Sequence[int], batch_size: int) -> float:
    """Images per second of ``backbone``'s forward on random batches (after one warm-up)."""
    images = torch.rand(batch_size, *input_size)
    labels = torch.zeros(batch_size, dtype=torch.long)
    backbone.forward(images, labels)
    started = time.perf_counter()
    for _ in range(RATE_BATCHES):
        backbone.forward(images, labels)  # returns CPU tensors: the device has finished
    return RATE_BATCHES * batch_size / (time.perf_counter() - started)


def estimate(
    *,
    sizes: dict[str, int],
    prefixes: dict[str, ShardPrefix],
    measurement: Measurement,
    epochs: int,
    done: set[tuple[int, str]] | None = None,
) -> Estimate:
    """Rows and bytes of a job over the shards ``sizes`` for ``epochs`` epochs.

    ``done`` holds (epoch, shard URL) units already committed, left out of rows and bytes.
    """
    read = sum(p.bytes for p in prefixes.values())
    per_byte = sum(len(p.samples) for p in prefixes.values()) / read if read else 0.0
    counted = {url for url, prefix in prefixes.items() if prefix.complete}
    samples = {
        url: len(prefixes[url].samples)
        if url in counted
        else round(max(0, size - TAR_END) * per_byte)
        for url, size in sizes.items()
    }
    shard_rows = {
        url: measurement.kept_per_shard[url] if url in counted else round(count * measurement.kept)
        for url, count in samples.items()
    }
    done = done or set()
    # each of a shard's units is the same rows and bytes: a shard's times its epochs to do
    # (a walk over every epoch's units took minutes at a large --epochs)
    done_per_shard = Counter(url for epoch, url in done if 0 <= epoch < epochs)
    rows = total_bytes = 0
    for url, unit_rows in shard_rows.items():
        left = epochs - done_per_shard[url]
        rows += left * unit_rows
        total_bytes += left * round(
            measurement.unit_file_bytes + unit_rows * measurement.bytes_per_row
        )
    return Estimate(
        shards=len(sizes),
        epochs=epochs,
        samples=sum(samples.values()),
        counted_shards=len(counted),
        rows=rows,
        bytes=total_bytes,
        units=len(sizes) * epochs,
        units_done=len(done),
    )
