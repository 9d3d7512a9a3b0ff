"""The cache's record of itself: provenance and committed units, in ``<cache>/_manifest.json``."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import fsspec

from pipeline.named import counted
from pipeline.retry import bucket_kept, make_folder, place, read_bytes, retry
from schemas import SCHEMA_VERSION, is_newer, validate_manifest

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
IDENTITY_FIELDS = (
    "schema_version",
    "backbone",
    "weights_digest",
    "model_kwargs",
    "transform",
    "seed",
    "dtype",
    "label_remap_digest",
    "label_space",
    "ambiguity_key",
    "compute",
)
#: Identity fields a provenance holds only when set (absent: none), so that the identity of a
#: cache without one is what it was before the field existed.
SET_ONLY_FIELDS = ("model_kwargs",)


def identity(provenance: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``provenance`` that define its cache."""
    return {
        name: provenance.get(name)
        for name in IDENTITY_FIELDS
        if name in provenance or name not in SET_ONLY_FIELDS
    }


def read_manifest(url: str) -> dict[str, Any] | None:
    """The validated ``_manifest.json`` of the cache at ``url``, or None where it has none;
    raises ``ValueError`` naming the file if it is not a valid manifest, or ``url`` if it
    names a file (a unit's, the manifest's) rather than a cache's folder."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        data = read_bytes(fs, f"{root.rstrip('/')}/{MANIFEST_NAME}")
    except FileNotFoundError:
        # a file's URL on an object store, which has no NotADirectoryError (a key that is an
        # object and a prefix of units too is read as the cache it holds)
        if fs.isfile(root) and not fs.isdir(root):
            raise not_a_folder(url) from None
        return None
    except NotADirectoryError:  # a unit's, the manifest's or another file's path
        raise not_a_folder(url) from None
    where = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        document = json.loads(data)  # a JSONDecodeError is a ValueError
    except ValueError as error:
        raise _invalid(where, error) from None
    version = document.get("schema_version") if isinstance(document, dict) else None
    if is_newer(version, SCHEMA_VERSION):
        raise ValueError(
            f"{where} was written by a newer pvu (schema_version {version}; this pvu reads up "
            f"to {SCHEMA_VERSION}): upgrade pvu"
        )
    try:
        validate_manifest(document)
    except ValueError as error:
        raise _invalid(where, error) from None
    return document


def not_a_folder(url: str) -> ValueError:
    """The refusal of a cache URL that names a file (a unit's, the manifest's)."""
    return ValueError(
        f"{url} is a file, not a cache: give the cache's folder, the one that holds "
        f"{MANIFEST_NAME} and epoch=*/"
    )


def _invalid(where: str, error: ValueError) -> ValueError:
    """The refusal of a manifest this pvu should read but cannot."""
    return ValueError(
        f"{where} is not a valid manifest: {error}. Move it aside: readers then read the "
        "units' own footers, and the same pvu cache command writes it anew from them"
    )


class ProvenanceMismatch(ValueError):
    """A run asked for a cache that differs from the one already at the output prefix."""


#: What a provenance field's absent keys mean, as refusals name them: a transform without
#: ``decode`` was decoded by Pillow (``--decode pil``, which records none).
ABSENT_MEANS: dict[str, dict[str, Any]] = {"transform": {"decode": "pil"}}


def spelled_out(provenance: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` with the keys ``ABSENT_MEANS`` knows filled in where absent, so that a
    message names ``decode: 'pil'`` rather than None; equal provenances stay equal."""
    filled = dict(provenance)
    for name, defaults in ABSENT_MEANS.items():
        if isinstance(filled.get(name), dict):
            filled[name] = {**defaults, **filled[name]}
    return filled


def provenance_differences(
    existing: dict[str, Any],
    requested: dict[str, Any],
    sides: tuple[str, str] = ("cache has", "this run asks for"),
) -> list[str]:
    """Human-readable differences between two provenances in the fields that define a cache,
    each ``name: <sides[0]> A, <sides[1]> B``."""
    existing, requested = spelled_out(existing), spelled_out(requested)
    had, asked = sides
    differences = []
    for name in IDENTITY_FIELDS:
        old, new = existing.get(name), requested.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [
                f"{name}.{key}: {had} {old.get(key)!r}, {asked} {new.get(key)!r}"
                for key in sorted(old.keys() | new.keys())
                if old.get(key) != new.get(key)
            ]
        else:
            differences.append(f"{name}: {had} {old!r}, {asked} {new!r}")
    return differences


def check_provenance(existing: dict[str, Any], requested: dict[str, Any], where: str) -> None:
    """Raise ``ProvenanceMismatch`` naming each differing field if the two caches differ."""
    differences = provenance_differences(existing, requested)
    if differences:
        raise ProvenanceMismatch(
            f"refusing to mix caches at {where}; write to another folder (the --output or "
            "--also target naming it). " + "; ".join(differences)
        )


#: The failed units a manifest names (it counts them all).
FAILED_UNITS_KEPT = 20


def unfinished_note(last_run: dict[str, Any] | None) -> str | None:
    """What a reader should know of a cache whose last run (``last_run`` of its manifest) did
    not finish, or failed units; None for one that finished whole (or predates the record)."""
    if not last_run:
        return None
    if not last_run.get("finished"):
        return (
            "its last pvu cache run did not finish (stopped or killed), so units may be "
            "missing; the same pvu cache command completes it"
        )
    if last_run.get("failed"):
        named = ", ".join(last_run.get("failed_units", [])[:3])
        return (
            f"its last pvu cache run failed {counted(last_run['failed'], 'unit')} (e.g. {named}), "
            "which it lacks; the same pvu cache command tries them again"
        )
    return None


#: The manifest is rewritten whole; waiting this many times its last write time between writes
#: keeps the driver's share in them under 5% however many units the cache holds.
WRITE_SHARE_LIMIT = 20


class Manifest:
    """Committed units of one cache; the driver owns it and writes it atomically, throttled.

    A write costs time linear in the units held (about 20 us each), so writes are spaced at
    least ``flush_seconds`` and at least ``WRITE_SHARE_LIMIT`` times the last write's time
    apart; only entries recorded since the last write are validated again. Units committed
    after the last write are not lost by a crash: the next run adopts them from their footers.
    """

    def __init__(
        self,
        root: str,
        provenance: dict[str, Any],
        flush_seconds: float = 10.0,
        lock_lost: threading.Event | None = None,
    ):
        self.root = root.rstrip("/")
        self.provenance = provenance
        self.units: dict[str, dict[str, Any]] = {}
        #: Per epoch, the digest of its units when a duplicate-key pass last found them clean.
        self.deduplicated: dict[str, str] = {}
        #: The last run on the cache: its units, whether it finished, the units it failed.
        self.last_run: dict[str, Any] | None = None
        self.flush_seconds = flush_seconds
        #: Set when the run's lock went to another run: the manifest is then its to write.
        self.lock_lost = lock_lost or threading.Event()
        self._fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self._last_flush = 0.0
        self._last_write_seconds = 0.0
        self._fresh: set[str] = set()  # recorded since the last write, not yet validated
        self._dirty = False

    @classmethod
    def open(
        cls, root: str, provenance: dict[str, Any], lock_lost: threading.Event | None = None
    ) -> Manifest:
        """The manifest at ``root`` (empty if absent), refusing a different provenance;
        it stops writing once ``lock_lost`` is set.

        It is not yet reconciled with storage: ``pipeline.cache.verify.reconcile`` does that.
        """
        manifest = cls(root, provenance, lock_lost=lock_lost)
        document = read_manifest(manifest.root)
        if document is None:
            return manifest
        check_provenance(document["provenance"], provenance, root)
        manifest.units = document["units"]
        manifest.deduplicated = document.get("deduplicated", {})
        manifest.last_run = document.get("last_run")
        return manifest

    @property
    def rows(self) -> int:
        """Rows across the committed units."""
        return sum(unit["rows"] for unit in self.units.values())

    def is_done(self, relpath: str) -> bool:
        """Whether the unit at ``relpath`` is committed."""
        return relpath in self.units

    def record(self, relpath: str, entry: dict[str, Any]) -> None:
        """Record a committed unit; the manifest is rewritten at most every ``flush_seconds``."""
        self.units[relpath] = entry
        self._fresh.add(relpath)
        self._dirty = True
        self.flush()

    def mark_deduplicated(self, epoch: int, digest: str) -> None:
        """Record that epoch ``epoch``'s units, as ``digest`` describes them, hold each key once."""
        self.deduplicated[str(epoch)] = digest
        self._dirty = True

    def begin_run(self, units: int) -> None:
        """Record (and write) that a run of ``units`` units started: until :meth:`end_run`,
        readers warn that the cache may lack units (the run stopped or was killed)."""
        self.last_run = {"units": units, "finished": False}
        self._dirty = True
        self.flush(force=True)
        self._last_flush = 0.0  # not a unit's write: the first unit committed is written at once

    def end_run(self, failed: Iterable[str]) -> None:
        """Record (and write) that the run finished, with the units it ``failed`` for good."""
        failed = sorted(failed)
        self.last_run = {
            **(self.last_run or {}),
            "finished": True,
            "failed": len(failed),
            "failed_units": failed[:FAILED_UNITS_KEPT],
        }
        self._dirty = True
        self.flush(force=True)

    def forget(self, relpath: str) -> None:
        """Drop a unit from the record (its file is gone or damaged), so it is computed again."""
        if self.units.pop(relpath, None) is not None:
            self._fresh.discard(relpath)
            self._dirty = True

    def flush(self, force: bool = False) -> None:
        """Write the manifest aside, then move it into place, if it changed."""
        if not (self._dirty or force):
            return
        wait = max(self.flush_seconds, WRITE_SHARE_LIMIT * self._last_write_seconds)
        if not force and time.monotonic() - self._last_flush < wait:
            return
        if self.lock_lost.is_set():
            if force:  # the next run adopts this run's units from their footers
                log.warning("%s/%s not written: this run lost its lock", self.root, MANIFEST_NAME)
            return
        started = time.perf_counter()
        document = {
            "schema_version": SCHEMA_VERSION,
            "provenance": self.provenance,
            "units": {relpath: self.units[relpath] for relpath in sorted(self._fresh)},
            "project_version": self.provenance.get("project_version", ""),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        validate_manifest(document)  # the others were validated when read or last written
        document["units"] = dict(sorted(self.units.items()))
        if self.deduplicated:
            document["deduplicated"] = dict(sorted(self.deduplicated.items()))
        if self.last_run is not None:
            document["last_run"] = self.last_run
        data = json.dumps(document, separators=(",", ":")).encode()  # C encoder: no indent

        def write_then_move() -> None:
            make_folder(self._fs, self._root_path)
            staging = f"{self._root_path}/.{MANIFEST_NAME}.{uuid.uuid4().hex}"
            self._fs.pipe_file(staging, data)
            place(self._fs, staging, f"{self._root_path}/{MANIFEST_NAME}")

        with bucket_kept(self._fs, self._root_path):
            retry(write_then_move, what=f"write {self.root}/{MANIFEST_NAME}")
        self._last_flush = time.monotonic()
        self._last_write_seconds = time.perf_counter() - started
        self._fresh.clear()
        self._dirty = False
