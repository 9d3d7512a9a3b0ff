"""One row per key and epoch: a key that two units of one epoch hold keeps its first copy only.

A WebDataset key names one sample, but nothing stops two shards of a run from holding the
same key (a sample packed twice, two shard sets merged). Each unit sees one shard, so none can
tell; the driver checks once the units are committed. Per epoch it reads the ``key`` column
of every committed unit (one column: about 1% of a unit file), ranks the units by shard (the
run's shard order, then any other shard of the cache by name) and keeps each key's first row
in that order, so which copy stays never depends on which unit finished first. A unit that
holds a later copy is rewritten without it (written aside, moved into place, like any commit)
and counts it as ``duplicate_key`` in its skips, in its footer and in the manifest. A cache
without duplicates is only read; running the pass again changes nothing. The manifest keeps,
per epoch, a digest of the units the last pass found clean: a run that adds or recomputes none
of an epoch's units reads none of its keys.

Keys are compared by a 64-bit hash (8 bytes a key, one epoch at a time); the keys behind a
hash that two rows share are then compared as strings, so a collision never drops a sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.manifest import Manifest
from pipeline.cache.skips import SkipReason
from pipeline.cache.writer import commit_unit
from pipeline.named import NAMED, counted, named_level
from pipeline.retry import retry

log = logging.getLogger(__name__)

DUPLICATE = SkipReason.DUPLICATE_KEY.value


def deduplicate(
    manifest: Manifest,
    shard_order: Sequence[str],
    *,
    io_threads: int = 16,
    on_read: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, int]:
    """Drop every later copy of a key within each epoch of ``manifest``'s cache.

    ``shard_order``: the run's shard names; their units rank first, in this order. Returns the
    rows dropped per rewritten unit (relpath -> count); the first ``NAMED`` such units are
    logged one warning each, the rest at debug level. An epoch whose units are as the last
    pass found them clean is not read; the manifest is written if an epoch was.
    ``on_read(done, total)`` is called before the first unit's keys are read and after each
    (for a progress bar): ``total`` counts the units of the epochs to read.
    """
    rank = {name: i for i, name in enumerate(shard_order)}

    def shard_rank(relpath: str) -> tuple[int, str]:
        shard = manifest.units[relpath]["shard"]
        return rank.get(shard, len(rank)), shard

    by_epoch: dict[int, list[str]] = defaultdict(list)
    for relpath in sorted(manifest.units, key=shard_rank):
        if manifest.units[relpath]["rows"]:
            by_epoch[manifest.units[relpath]["epoch"]].append(relpath)
    to_read = {  # the other epochs were checked as they are by an earlier pass
        epoch: units
        for epoch, units in sorted(by_epoch.items())
        if manifest.deduplicated.get(str(epoch)) != units_digest(manifest, units)
    }
    total, done = sum(map(len, to_read.values())), 0
    on_read(done, total)

    def read_one() -> None:
        nonlocal done
        done += 1
        on_read(done, total)

    dropped: dict[str, int] = {}
    for epoch, units in to_read.items():
        sizes = [manifest.units[relpath]["bytes"] for relpath in units]
        for relpath, (rows, example) in later_copies(
            manifest.root, units, sizes, io_threads, on_read=read_one
        ).items():
            drop_rows(manifest, relpath, rows)
            dropped[relpath] = len(rows)
            log.log(
                named_level(len(dropped) - 1),
                "%s/%s: dropped %s whose key an earlier row of epoch %d holds "
                "(e.g. %s, kept in %s); counted as %s",
                manifest.root,
                relpath,
                counted(len(rows), "row"),
                epoch,
                *example,
                DUPLICATE,
            )
        manifest.mark_deduplicated(epoch, units_digest(manifest, units))
    if to_read:
        manifest.flush(force=True)
    if len(dropped) > NAMED:  # keys that restart in every shard: one line per unit else
        log.warning(
            "%s: %s than named above had rows dropped as %s; --verbose names each",
            *(manifest.root, counted(len(dropped) - NAMED, "more unit"), DUPLICATE),
        )
    return dropped


def units_digest(manifest: Manifest, units: Sequence[str]) -> str:
    """A digest of ``units`` in their order, each with its size, rows and skips: a unit added,
    recomputed (with its duplicates again) or reordered changes it."""
    digest = hashlib.sha256()
    for relpath in units:
        entry = manifest.units[relpath]
        skipped = json.dumps(entry["skipped"], sort_keys=True)
        digest.update(f"{relpath}\0{entry['bytes']}\0{entry['rows']}\0{skipped}\n".encode())
    return digest.hexdigest()[:32]


def read_keys(root: str, relpath: str, size: int | None = None) -> pa.ChunkedArray:
    """The ``key`` column of unit ``relpath`` of the cache at ``root`` (only that column)."""
    fs, path = fsspec.core.url_to_fs(root)

    def read() -> pa.ChunkedArray:
        with fs.open(f"{path.rstrip('/')}/{relpath}", "rb", size=size) as handle:
            return pq.read_table(handle, columns=["key"], page_checksum_verification=True).column(
                "key"
            )

    try:
        return retry(read, what=f"read the keys of {root.rstrip('/')}/{relpath}")
    except FileNotFoundError as error:  # deleted since its commit (by hand, a cleanup)
        raise FileNotFoundError(
            f"{error}; the unit was removed after it was committed: run the same command "
            "again, which computes it anew"
        ) from error


def _hashes(keys: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each key (Python's own: the pass runs in one process)."""
    return np.fromiter(map(hash, keys.to_pylist()), dtype=np.int64, count=len(keys))


def later_copies(
    root: str,
    units: Sequence[str],
    sizes: Sequence[int],
    io_threads: int = 16,
    *,
    on_read: Callable[[], None] = lambda: None,
) -> dict[str, tuple[np.ndarray, tuple[str, str]]]:
    """Rows of ``units`` (in rank order) whose key an earlier row holds, by unit, each with an
    example (key, unit that keeps it) for the log. ``on_read()`` follows each unit's keys read."""

    def unit_hashes(unit: str, size: int) -> np.ndarray:
        return _hashes(read_keys(root, unit, size))

    hashes: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        for unit_hash in pool.map(unit_hashes, units, sizes):
            hashes.append(unit_hash)
            on_read()
    if not hashes:
        return {}
    starts = np.cumsum([0, *map(len, hashes)])
    flat = np.concatenate(hashes)
    del hashes
    order = np.argsort(flat, kind="stable")  # equal hashes stay in row order
    ordered = flat[order]
    del flat
    repeated = ordered[1:] == ordered[:-1]
    shared = np.zeros(len(ordered), bool)
    shared[1:] |= repeated
    shared[:-1] |= repeated
    positions = order[shared]  # grouped by hash, ascending within a group
    del order, ordered
    if not len(positions):
        return {}
    unit_of = np.searchsorted(starts, positions, side="right") - 1
    keys = np.empty(len(positions), object)
    for unit in np.unique(unit_of):
        mine = unit_of == unit
        column = read_keys(root, units[unit], sizes[unit])
        keys[mine] = column.take(pa.array(positions[mine] - starts[unit])).to_pylist()
    first: dict[str, int] = {}
    found: dict[int, list[int]] = defaultdict(list)
    example: dict[int, tuple[str, str]] = {}
    for position, unit, key in zip(positions.tolist(), unit_of.tolist(), keys, strict=True):
        if key not in first:
            first[key] = unit
            continue
        found[unit].append(position - int(starts[unit]))
        example.setdefault(unit, (key, units[first[key]]))
    return {units[unit]: (np.sort(np.array(rows)), example[unit]) for unit, rows in found.items()}


def drop_rows(manifest: Manifest, relpath: str, rows: np.ndarray) -> None:
    """Rewrite unit ``relpath`` without ``rows``, counting them as duplicates in its footer and
    manifest entry."""
    fs, path = fsspec.core.url_to_fs(manifest.root)
    entry = manifest.units[relpath]
    where = f"{manifest.root}/{relpath}"

    def read() -> pa.Table:
        with fs.open(f"{path.rstrip('/')}/{relpath}", "rb", size=entry["bytes"]) as handle:
            return pq.read_table(handle, page_checksum_verification=True)

    table = retry(read, what=f"read {where}")
    keep = np.ones(table.num_rows, bool)
    keep[rows] = False
    kept = table.filter(pa.array(keep))
    stats = after_drop(entry, len(rows))
    size = commit_unit(
        kept.to_batches(), kept.schema, root=manifest.root, relpath=relpath, stats=stats
    )
    manifest.record(relpath, {**stats, "bytes": size})


def after_drop(entry: dict[str, Any], dropped: int) -> dict[str, Any]:
    """A unit's manifest ``entry``, less its ``bytes``, once :func:`drop_rows` has dropped
    ``dropped`` more of its rows as duplicates (what the rewritten unit's footer records)."""
    skipped = dict(entry["skipped"])
    skipped[DUPLICATE] = skipped.get(DUPLICATE, 0) + dropped
    stats = {name: value for name, value in entry.items() if name != "bytes"}
    stats.update(rows=entry["rows"] - dropped, skipped=dict(sorted(skipped.items())))
    return stats
