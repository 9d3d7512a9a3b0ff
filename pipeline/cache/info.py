"""What a cache is and holds, from its manifest (or, where there is none, its unit footers).

Reads no row: provenance, units, rows, bytes, skips by reason, epochs and label space come
from ``_manifest.json`` or the ``pvu.unit`` stats each unit's Parquet footer carries.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.cache.index import COMPATIBLE_FIELDS
from pipeline.cache.lock import Holder
from pipeline.cache.manifest import MANIFEST_NAME, read_manifest
from pipeline.cache.verify import FooterRead, held_caches_note, list_unit_files, read_footers
from schemas import label_space, read_provenance, read_unit_stats


@dataclass(frozen=True)
class CacheInfo:
    """A cache's provenance and committed units (the manifest's entries, keyed by path)."""

    root: str
    provenance: dict[str, Any]
    units: dict[str, dict[str, Any]]
    source: str  # "manifest" or "footers"
    updated: str | None = None
    #: The manifest's record of the last ``pvu cache`` run (None without one).
    last_run: dict[str, Any] | None = None
    #: Units whose footer could not be read, and why (read from footers with ``keep_going``).
    unreadable: dict[str, str] = field(default_factory=dict)
    #: The live run holding the cache's lock as it was read (None: no run writes it).
    writer: Holder | None = None

    @property
    def rows(self) -> int:
        """Rows across all units."""
        return sum(unit["rows"] for unit in self.units.values())

    @property
    def bytes(self) -> int:
        """Bytes of all unit files on storage."""
        return sum(unit.get("bytes", 0) for unit in self.units.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped, by reason, over all units (a sample counts once per epoch)."""
        total: Counter[str] = Counter()
        for unit in self.units.values():
            total.update(unit.get("skipped", {}))
        return dict(sorted(total.items()))

    @property
    def epochs(self) -> dict[int, tuple[int, int]]:
        """Epoch -> (units, rows)."""
        units: Counter[int] = Counter()
        rows: Counter[int] = Counter()
        for unit in self.units.values():
            units[unit["epoch"]] += 1
            rows[unit["epoch"]] += unit["rows"]
        return {epoch: (units[epoch], rows[epoch]) for epoch in sorted(units)}

    @property
    def shards(self) -> int:
        """Distinct input shards."""
        return len({unit["shard"] for unit in self.units.values()})

    def label_space(self) -> str:
        """Which labels the ``label`` column holds, in words."""
        provenance = self.provenance
        if label_space(provenance) == "dataset":
            return "the dataset's own (no loss: labels unknown to the classifier)"
        classes = provenance.get("num_classes")
        text = f"the classifier's ({classes:,} classes)" if classes else "the classifier's"
        remap = provenance.get("label_remap_digest")
        return f"{text}, shard labels remapped (remap {remap})" if remap else text

    def writing(self) -> str | None:
        """The live run writing the cache, in words (None: none)."""
        return self.writer.describe(time.time()) if self.writer else None

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON (``pvu info --json``)."""
        return {
            "cache": self.root,
            "source": self.source,
            "updated": self.updated,
            "last_run": self.last_run,
            "being_written_by": self.writing(),
            "provenance": self.provenance,
            "label_space": self.label_space(),
            "units": len(self.units),
            "shards": self.shards,
            "rows": self.rows,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "epochs": {str(e): {"units": u, "rows": r} for e, (u, r) in self.epochs.items()},
        }


def read_cache_info(url: str, *, keep_going: bool = False) -> CacheInfo:
    """The :class:`CacheInfo` of the cache at ``url``.

    Raises ``FileNotFoundError`` if nothing is there and ``ValueError`` if it is no pvu cache,
    or, read from footers, a unit's footer is unreadable (``keep_going``: listed in the info's
    ``unreadable`` instead, unless no unit is readable).
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"cache {url} does not exist")
    document = read_manifest(url)
    if document is not None:
        return CacheInfo(
            url,
            document["provenance"],
            document["units"],
            "manifest",
            document.get("updated"),
            document.get("last_run"),
        )
    return _from_footers(url, root, keep_going=keep_going)


def _from_footers(url: str, root: str, *, keep_going: bool) -> CacheInfo:
    """The info of the cache at ``url`` (``root`` on its filesystem) from its units' footers,
    read in parallel."""
    sizes = list_unit_files(url)
    if not sizes:  # a file's URL was refused by read_manifest
        raise ValueError(
            f"{url} is not a pvu cache: no {MANIFEST_NAME} and no epoch=<number>/*.parquet"
            + held_caches_note(url)
        )
    units: dict[str, dict[str, Any]] = {}
    unreadable: dict[str, str] = {}
    provenance: dict[str, Any] = {}
    first = ""
    for relpath, footer in read_footers(url, dict(sorted(sizes.items()))):
        path = f"{root}/{relpath}"
        try:
            own, stats = _unit_footer(path, footer)
        except ValueError as error:
            if not keep_going:
                raise
            unreadable[relpath] = str(error).removeprefix(f"{path}: ")
            continue
        first, provenance = first or path, provenance or own
        _check_same_cache(url, (first, provenance), (path, own))
        units[relpath] = {**stats, "bytes": sizes[relpath]}
    if not units:
        named = "; ".join(f"{relpath}: {why}" for relpath, why in list(unreadable.items())[:3])
        raise ValueError(f"{url}: no unit's footer is readable ({named})")
    return CacheInfo(url, provenance, units, "footers", unreadable=unreadable)


def _unit_footer(path: str, footer: FooterRead) -> tuple[dict[str, Any], dict[str, Any]]:
    """The provenance and stats a unit file's footer holds; ``ValueError`` naming it."""
    if isinstance(footer, FileNotFoundError):
        raise footer
    if isinstance(footer, ValueError):  # cut short, empty, not Parquet
        raise ValueError(f"{path}: not a readable Parquet file ({footer})") from None
    try:
        schema = footer.schema.to_arrow_schema()
        provenance, stats = read_provenance(schema), read_unit_stats(schema.metadata)
    except ValueError:  # no provenance, or a record that is no JSON
        stats = None
    if stats is None:
        raise ValueError(f"{path}: not a pvu cache unit (no pvu provenance)")
    return provenance, stats


UnitProvenance = tuple[str, dict[str, Any]]


def _check_same_cache(url: str, reference: UnitProvenance, unit: UnitProvenance) -> None:
    """Refuse a bare cache whose ``unit`` (path, provenance) is of another cache than the
    ``reference`` unit, as every reader does; else the summary would show the first one's."""
    (first, expected), (path, found) = reference, unit
    for name in COMPATIBLE_FIELDS:
        if found.get(name) != expected.get(name):
            raise ValueError(
                f"{url} mixes units of different caches (no {MANIFEST_NAME}): {name} is "
                f"{expected.get(name)} in {first} but {found.get(name)} in {path}; readers "
                "refuse it: move the units of one cache elsewhere"
            )
