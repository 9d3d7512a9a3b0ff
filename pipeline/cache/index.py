"""The files of one or more caches, checked to belong together, as a list of row groups.

Reads the manifest (or lists the unit files where there is none) and every Parquet footer;
refuses caches whose schema version, backbone, weights, embedding width, embedding dtype or
label space differ, empty caches, caches whose manifest lists units that storage lacks or
holds damaged and, for training, caches without losses (the dataset's own label space).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.lock import live_holder
from pipeline.cache.manifest import (
    MANIFEST_NAME,
    identity,
    provenance_differences,
    unfinished_note,
)
from pipeline.cache.shards import is_tar, spelled_alike
from pipeline.cache.verify import (
    held_caches_note,
    list_unit_files,
    read_footer,
    require_consistent,
)
from pipeline.retry import retry
from schemas import (
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    cache_schema,
    embedding_dim,
    label_space,
    leaf_column,
    read_provenance,
    read_unit_stats,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_EPOCH_IN_PATH = re.compile(r"/epoch=(\d+)/[^/]*$")

COMPATIBLE_FIELDS = (
    "schema_version",
    "backbone",
    "weights_digest",
    "model_kwargs",
    "embedding_dim",
    "label_space",
)
"""Provenance fields that must agree for caches to be read together."""


@dataclass(eq=False)
class CacheFile:
    """One committed Parquet unit: its URL, Parquet footer and provenance."""

    url: str
    metadata: pq.FileMetaData
    provenance: dict[str, Any]
    cache: str = ""

    @property
    def rows(self) -> int:
        """Rows in the file."""
        return self.metadata.num_rows

    @property
    def dtype(self) -> str:
        """NumPy name of the stored embedding's element type (``float16``, ``float32``)."""
        value_type = self.metadata.schema.to_arrow_schema().field("embedding").type.value_type
        return np.dtype(value_type.to_pandas_dtype()).name

    @property
    def origin(self) -> str:
        """The cache the unit belongs to: its ``cache`` prefix, or its own URL without one."""
        return self.cache or self.url

    @property
    def unit(self) -> dict[str, Any]:
        """The unit's record of itself in its footer (``epoch``, ``shard``, ``source``, ...);
        empty for a unit written before pvu kept one."""
        return read_unit_stats(self.metadata.metadata) or {}

    @property
    def epoch(self) -> int | None:
        """The augmentation epoch in the unit's path (``epoch=<EEEE>/``), if it has one."""
        found = _EPOCH_IN_PATH.search(self.url)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class RowGroupRef:
    """Row group ``group`` of file number ``file`` in a :class:`CacheIndex`, with its size."""

    file: int
    group: int
    rows: int


@dataclass(eq=False)
class CacheIndex:
    """The files of one or more compatible caches, ready to stream."""

    files: list[CacheFile]
    provenance: dict[str, Any]
    dim: int
    empty_files: list[str] = field(default_factory=list)
    dtype: str = "float16"
    #: cache URL -> why its units may be incomplete (a run still writing it, or one that did
    #: not finish or failed units), for the caches that may be
    incomplete: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows across all files (training and validation)."""
        return sum(f.rows for f in self.files)

    @property
    def epochs(self) -> int:
        """Augmented views of an image among the files: the most distinct (epoch, augmentation)
        pairs of any one source shard, so caches of the same shards made with other seeds or
        transforms add their epochs (each one view of every image) rather than share them."""
        views: dict[str, set[tuple[int | None, str]]] = {}
        for f in self.files:
            made = json.dumps(_views(identity(f.provenance)), sort_keys=True, default=str)
            source = spelled_alike(str(f.unit.get("source", "")))
            views.setdefault(source, set()).add((f.epoch, made))
        return max(map(len, views.values()), default=0)

    def row_groups(self) -> list[RowGroupRef]:
        """Every non-empty row group, in file order."""
        return [
            RowGroupRef(i, g, f.metadata.row_group(g).num_rows)
            for i, f in enumerate(self.files)
            for g in range(f.metadata.num_row_groups)
            if f.metadata.row_group(g).num_rows > 0
        ]


def list_cache_files(url: str, listed: list[str] | None) -> dict[str, str]:
    """The committed unit files of the cache at ``url``: its manifest's ``listed`` units, else
    (a cache without a manifest) those storage lists; their URLs by path relative to the cache."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if not fs.exists(root):
        raise FileNotFoundError(f"cache {url} does not exist")
    if listed is not None:
        relpaths = listed
    else:
        log.info("%s has no %s; listing its epoch=*/ folders", url, MANIFEST_NAME)
        relpaths = sorted(list_unit_files(url))
    return {relpath: f"{prefix}{root}/{relpath}" for relpath in relpaths}


def _read_footer(
    url: str, cache: str, relpath: str, metadata: pq.FileMetaData | None = None
) -> CacheFile:
    """Unit ``url`` (``relpath`` in ``cache``), from its footer (read here unless given)."""
    if metadata is None:
        try:
            metadata = read_footer(cache, relpath)
        except FileNotFoundError:
            raise FileNotFoundError(f"cache unit listed but missing: {url}") from None
        except ValueError as error:  # pyarrow's ArrowInvalid: cut short, empty, not Parquet
            raise ValueError(f"{url}: not a readable Parquet file ({error})") from None
    schema = metadata.schema.to_arrow_schema()
    try:
        provenance = read_provenance(schema)
    except ValueError as error:
        raise ValueError(f"{url}: {error}") from None
    if "embedding" not in schema.names:  # the other columns: _check_columns, once it is known
        raise ValueError(f"{url}: not a pvu cache file, column 'embedding' is missing")
    width = embedding_dim(schema)
    _check_columns(url, schema, cache_schema(width, schema.field("embedding").type.value_type))
    if provenance.get("embedding_dim") != width:
        raise ValueError(
            f"{url}: embedding column has width {width} but provenance says "
            f"{provenance.get('embedding_dim')}"
        )
    provenance["label_space"] = label_space(provenance)  # version 1 predates the field
    return CacheFile(url, metadata, provenance, cache)


def _check_columns(url: str, schema: pa.Schema, expected: pa.Schema) -> None:
    """Refuse a unit whose columns are not the row schema's (``ambiguity`` is optional: cache
    schema version 1 predates it); a manifest's checks catch this, a bare cache has none."""
    for column in expected:
        if column.name not in schema.names:
            if column.name == "ambiguity":
                continue
            raise ValueError(f"{url}: not a pvu cache file, column {column.name!r} is missing")
        found = schema.field(column.name).type
        if found != column.type and column.name != "embedding":  # its dtype is checked apart
            raise ValueError(
                f"{url}: column {column.name!r} is {found}, a pvu cache stores {column.type}"
            )


def check_compatible(files: Sequence[CacheFile]) -> dict[str, Any]:
    """The shared identity of ``files``; raises ``ValueError`` naming each field that differs."""
    first = files[0]
    problems = []
    for name in COMPATIBLE_FIELDS:
        seen: dict[str, str] = {}
        for f in files:
            seen.setdefault(json.dumps(f.provenance.get(name)), f.url)
        if len(seen) > 1:
            where = "; ".join(f"{value} in {url}" for value, url in seen.items())
            problems.append(f"{name} differs ({where})")
    if problems:
        raise ValueError("caches do not belong together: " + ", ".join(problems))
    version = first.provenance.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{first.url}: cache schema version {version} is not supported "
            f"(this reader reads versions {READABLE_VERSIONS}, newest {SCHEMA_VERSION})"
        )
    check_same_dtype(files)
    return {name: first.provenance.get(name) for name in COMPATIBLE_FIELDS}


def check_distinct_units(files: Sequence[CacheFile]) -> None:
    """Refuse a unit given twice: two files of one epoch of one source shard, made with the
    same settings, of the same rows, keys and losses (the same cache under two paths, or a
    copy), or of the same augmented images made twice (``--decode pil`` and ``device``, or on
    a CPU and a GPU: the same crops, losses a rounding apart), whose rows would be trained on
    twice."""
    seen: dict[str, CacheFile] = {}
    views: dict[str, CacheFile] = {}
    for f in files:
        unit = f.unit
        if not unit:
            continue
        source = unit.get("source")
        where = [unit.get("epoch"), unit.get("shard"), source and spelled_alike(str(source))]
        # other images once staged at the same path differ in these, from the footer
        first_group = next(_filled_groups(f), None)
        loss = None if first_group is None else _footer_loss_range(f, first_group)
        made = [identity(f.provenance), *where, f.rows, *_key_range(f)]
        first = seen.setdefault(json.dumps([*made, loss], sort_keys=True), f)
        if first is not f:
            raise ValueError(
                f"{first.url} and {f.url} are one unit (epoch {unit.get('epoch')} of "
                f"{unit.get('source')}, made with the same settings): the same cache given "
                "twice (under two paths, or as a copy), or two runs of the same shards and "
                "settings holding the same epochs? Give each epoch once: one cache, "
                + _epochs_once(files, first.origin, f.origin)
            )
        made[0] = _views(made[0])
        other = views.setdefault(json.dumps(made, sort_keys=True), f)
        # equal settings and other losses: other images once staged at the same path
        sides = ("the first has", "the second")
        differences = "; ".join(provenance_differences(other.provenance, f.provenance, sides))
        if differences:
            transform = f.provenance.get("transform")
            redrawn = not isinstance(transform, dict) or _draws_from_seed(transform)
            raise ValueError(
                f"{other.url} and {f.url} hold the same augmented images (epoch "
                f"{unit.get('epoch')} of {unit.get('source')}) made twice ({differences}): "
                "their rows would be trained on twice. Give one of the two caches"
                + (", or cache other epochs into the second" if redrawn else "")
            )


def _epochs_once(files: Sequence[CacheFile], first: str, second: str) -> str:
    """How to give each epoch of caches ``first`` and ``second`` (among ``files``) once: the
    one holding the other's (shard, epoch) units or, where each holds units the other lacks,
    one of all."""
    held = [
        {(spelled_alike(str(f.unit.get("source"))), f.epoch) for f in files if f.origin == cache}
        for cache in (first, second)
    ]
    for cache, mine, theirs in ((first, *held), (second, *held[::-1])):
        if mine >= theirs:
            return f"or {cache}, which holds the other's units"
    count = max((e for _, e in held[0] | held[1] if e is not None), default=0) + 1
    return (
        "or, as each holds units the other lacks, one cache of every shard and epoch of both "
        f"(pvu cache --epochs {count} into one of them, of both's shards)"
    )


def _views(identity: dict[str, Any]) -> dict[str, Any]:
    """What of a cache's ``identity`` picks its augmented images: not where they were decoded
    (``--decode``), on what device and precision, how the embedding is stored, which member
    gave the ambiguity column, or the seed of a transform that draws nothing from it."""
    left_out = {"compute", "dtype", "ambiguity_key"}
    transform = identity.get("transform")
    if isinstance(transform, dict) and not _draws_from_seed(transform):
        left_out.add("seed")
    views = {name: value for name, value in identity.items() if name not in left_out}
    if isinstance(transform, dict):
        views["transform"] = {name: value for name, value in transform.items() if name != "decode"}
    return views


def _draws_from_seed(transform: dict[str, Any]) -> bool:
    """Whether the resolved ``transform`` (``pipeline.cache.augment``) draws from its samples'
    seeds: a training one (random crops, flips, jitter), or an eval one adding noise
    (``pipeline.cache.deteriorate``); any other eval transform makes one image of each seed."""
    deterioration = transform.get("deterioration") or {}
    return transform.get("is_training") is not False or deterioration.get("kind") == "noise"


def check_same_dtype(files: Sequence[CacheFile]) -> str:
    """The embedding dtype all ``files`` share; raises ``ValueError`` naming the caches if not.

    A head is trained on (and exported for) one input dtype: float16 and float32 embeddings
    of the same backbone round differently, so mixing them would blur what the head expects.
    """
    caches: dict[str, list[str]] = {}
    example: dict[str, str] = {}
    for f in files:
        where = caches.setdefault(f.dtype, [])
        example.setdefault(f.dtype, f.url)
        if f.origin not in where:
            where.append(f.origin)
    if len(caches) > 1:
        listed = "; ".join(
            f"{dtype} in {', '.join(urls)} (e.g. {example[dtype]})"
            for dtype, urls in caches.items()
        )
        raise ValueError(f"caches store embeddings in different dtypes ({listed}); train on one")
    return files[0].dtype


def _key_range(f: CacheFile) -> tuple[str | None, str | None]:
    """The smallest and largest key of unit ``f``'s first row group, from its footer."""
    if not f.metadata.num_row_groups:
        return None, None
    stats = f.metadata.row_group(0).column(leaf_column(f.metadata, "key")).statistics
    has = stats is not None and stats.has_min_max
    return (str(stats.min), str(stats.max)) if has else (None, None)


def _filled_groups(f: CacheFile) -> Iterator[int]:
    """The row groups of unit ``f`` that hold rows."""
    return (g for g in range(f.metadata.num_row_groups) if f.metadata.row_group(g).num_rows)


def _footer_loss_range(f: CacheFile, group: int) -> tuple[float, float] | None:
    """(smallest, largest) loss of row group ``group`` of unit ``f`` by its footer's
    statistics; None where it has none (another writer, or every loss NaN) or they hold an
    infinite loss (training drops it, so the finite ones must be read)."""
    stats = f.metadata.row_group(group).column(leaf_column(f.metadata, "loss")).statistics
    if stats is None or not stats.has_min_max or not np.isfinite([stats.min, stats.max]).all():
        return None
    return stats.min, stats.max


def _read_loss_range(f: CacheFile, group: int) -> tuple[float, float] | None:
    """(smallest, largest) finite loss of row group ``group`` of unit ``f``, its loss column
    read (4 bytes a row); None where no loss is finite."""
    fs, path = fsspec.core.url_to_fs(f.url)

    def read() -> pa.ChunkedArray:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle, metadata=f.metadata)
            return parquet.read_row_group(group, columns=["loss"]).column("loss")

    column = retry(read, what=f"read the losses of row group {group} of {f.url}")
    losses = column.to_numpy().astype(np.float64)  # a null (no loss) reads as NaN
    losses = losses[np.isfinite(losses)]  # training drops NaN/inf losses
    return (float(losses.min()), float(losses.max())) if losses.size else None


def _loss_extents(f: CacheFile) -> Iterator[tuple[float, float]]:
    """(smallest, largest) loss of each row group of unit ``f`` that holds a loss: from its
    footer's statistics or, for a group without them, from its loss column."""
    for group in _filled_groups(f):
        extent = _footer_loss_range(f, group) or _read_loss_range(f, group)
        if extent is not None:
            yield extent


def check_losses_vary(files: Sequence[CacheFile]) -> None:
    """Refuse a cache whose every finite loss is one value: its classifier gives every image the
    same prediction (random weights with a zero-initialised classifier, say), so a head trained
    on it has no order to learn; and one whose rows hold no finite loss (training drops
    NaN/inf losses, so it would have no row to learn from). Read from the footers' statistics,
    and the loss column of a row group without them (or with an infinite loss): the scan of a
    cache stops at its first row group whose losses differ from the first's, or from each other
    (a cache's first group, as a rule)."""
    caches: dict[str, list[CacheFile]] = {}
    for f in files:
        caches.setdefault(f.origin, []).append(f)
    for cache, units in caches.items():
        ranges = itertools.chain.from_iterable(map(_loss_extents, units))
        first = next(ranges, None)
        if first is None and any(f.rows for f in units):
            raise ValueError(
                f"cache {cache}: no cached loss is finite (each is NaN or inf), and training "
                "drops such rows: the classifier's logits overflowed or are NaN (--weights "
                "damaged, or the model cast to float16?); cache it again with working --weights"
            )
        if first is None or first[0] != first[1] or sum(f.rows for f in units) < 2:
            continue
        if all(other == first for other in ranges):
            raise ValueError(
                f"cache {cache}: every cached loss is {first[0]:.6g}, so a head has no order to "
                "learn: the backbone gives every image the same prediction (random weights, "
                "or a classifier initialised to zero?); cache it with trained --weights"
            )


def open_cache(urls: Sequence[str], *, io_threads: int = 16, need_loss: bool = True) -> CacheIndex:
    """Index the caches at ``urls``: list units, read footers; refuse mixed or empty caches,
    caches whose storage does not match their manifest (``pipeline.cache.verify``) and, with
    ``need_loss`` (training), caches in the dataset's label space, whose loss is null."""
    if not urls:
        raise ValueError("no cache URL given")
    units, incomplete = _committed_units(urls, io_threads)
    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        files = list(pool.map(lambda item: _read_footer(item[0], *item[1]), units.items()))
    shared = check_compatible(files)
    check_distinct_units(files)
    if need_loss:
        _check_trainable(urls, files, shared)
    empty = [f.url for f in files if f.rows == 0]
    if empty:
        log.warning("%d cache unit(s) hold no rows, e.g. %s", len(empty), empty[0])
    files = [f for f in files if f.rows > 0]
    if not files:
        raise ValueError(f"caches {list(urls)} are empty: every unit has 0 rows")
    return CacheIndex(
        files, shared, int(shared["embedding_dim"]), empty, files[0].dtype, incomplete
    )


def _committed_units(
    urls: Sequence[str], io_threads: int
) -> tuple[dict[str, tuple[str, str, pq.FileMetaData | None]], dict[str, str]]:
    """Each committed unit of the caches at ``urls``: unit URL -> (cache URL, its path in the
    cache, its footer if the consistency check read it); and why a cache may lack units (one
    still being written, or left unfinished), each warned of. Refuses an empty cache and a
    unit listed twice."""
    units: dict[str, tuple[str, str, pq.FileMetaData | None]] = {}
    incomplete: dict[str, str] = {}
    for url in urls:
        writer = live_holder(url)  # first: a live run's rewrites are no damage to repair
        check = require_consistent(url, io_threads=io_threads, writer=writer)  # footers kept
        if writer is not None:
            incomplete[url] = f"still being written, by {writer.describe(time.time())}"
        elif note := unfinished_note(check.last_run):
            incomplete[url] = note
        if url in incomplete:
            log.warning("cache %s: %s; reading the units committed so far", url, incomplete[url])
        found = list_cache_files(url, check.listed)
        if not found:
            raise ValueError(
                f"cache {url} is empty: it has no committed Parquet unit{_shards_hint(url)}"
            )
        for relpath, unit in found.items():
            if unit in units:
                raise ValueError(f"cache unit listed twice (same cache given twice?): {unit}")
            units[unit] = (url, relpath, check.footers.get(relpath))
    return units, incomplete


def _check_trainable(urls: Sequence[str], files: list[CacheFile], shared: dict) -> None:
    """Refuse caches a head cannot learn from: no losses (the dataset's label space), losses
    that do not vary, or one row (none is refused by the caller)."""
    if shared["label_space"] == "dataset":
        raise ValueError(
            f"cache {', '.join(urls)} has no losses to train on: it was "
            "cached with --label-space dataset (the default of --augment eval); train the head "
            "on a cache in the classifier's label space (--augment train)"
        )
    check_losses_vary(files)
    if sum(f.rows for f in files) == 1:
        raise ValueError(
            f"caches {list(urls)} hold one row: a head learns the order of pairs of rows' "
            "losses; cache more images"
        )


def _shards_hint(url: str) -> str:
    """A note for a folder of shards, or of caches, given where a cache is wanted; empty
    otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        names = fs.ls(path, detail=False)
    except OSError:
        return ""
    if any(map(is_tar, names)):
        return "; it holds .tar shards: give the --output of a `pvu cache` run over them"
    return held_caches_note(url)


def read_unit(f: CacheFile, read: Callable[[], T], *, what: str, again: str) -> T:
    """``read()`` of unit ``f``, under :func:`retry`; a failure of a unit no longer the one
    indexed (rewritten by a ``pvu cache`` run, say) is raised naming it and ``again``, what to
    run once no such run writes to it."""
    try:
        return retry(read, what=what)
    except (OSError, ValueError) as error:
        if _changed(f):
            raise ValueError(
                f"cache unit {f.url} was rewritten or removed after it was indexed (by a pvu "
                f"cache run writing to that cache?): wait until no pvu cache run writes to it, "
                f"then {again}"
            ) from error
        raise


def _changed(f: CacheFile) -> bool:
    """Whether unit ``f`` is gone, or its footer is no longer the one it was indexed with."""
    fs, path = fsspec.core.url_to_fs(f.url)
    try:
        with fs.open(path, "rb") as handle:
            return not pq.read_metadata(handle).equals(f.metadata)
    except (FileNotFoundError, ValueError):  # gone, or no longer Parquet (pyarrow's words)
        return True
    except OSError:  # storage failing says nothing of the file: its first error stands
        return False
