"""Do the manifest and storage agree? The check `pvu cache` reconciles with and readers refuse on.

Storage is listed once per epoch folder (never one request per unit); a unit the manifest
lists is *damaged* when its file is missing, when its size differs from the recorded one, or
when its Parquet footer (read in parallel, one ranged read per file) describes another unit,
another row count or another cache. Committed files the manifest lacks are *orphans*: a run
killed between a unit's commit and the next manifest write leaves them, and `pvu cache`
adopts them. :func:`check_pages` goes further, on demand: it reads every page of the units
that passed and checks its CRC-32 (a byte damaged in place leaves size and footer as they were).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.dedupe import after_drop
from pipeline.cache.lock import Holder, live_holder
from pipeline.cache.manifest import (
    MANIFEST_NAME,
    Manifest,
    check_provenance,
    provenance_differences,
    read_manifest,
)
from pipeline.cache.shards import entry_name, storage_url
from pipeline.cache.writer import unit_path
from pipeline.named import NAMED, counted, named_level
from pipeline.retry import is_damaged_page, list_folder, read_bytes, retry
from schemas import read_provenance, read_unit_stats

log = logging.getLogger(__name__)

#: Unit fields the footer's own stats must repeat (``seconds`` and ``bytes`` are not in both).
FOOTER_FIELDS = ("epoch", "shard", "source", "source_bytes", "rows", "skipped")


class CacheMismatch(ValueError):
    """A cache's manifest lists units that storage lacks or holds damaged."""


@dataclass
class CacheCheck:
    """The outcome of comparing a cache's manifest with its storage."""

    url: str
    damaged: dict[str, str] = field(default_factory=dict)
    """Listed units whose file is missing or differs: relpath -> what is wrong."""
    orphans: dict[str, int] = field(default_factory=dict)
    """Committed unit files the manifest does not list: relpath -> size in bytes."""
    footers: dict[str, pq.FileMetaData] = field(default_factory=dict)
    """The footers the check read, of units that agree with the manifest: relpath -> footer
    (empty unless asked to keep them: a parsed footer takes ~280 KB for 32 row groups)."""
    listed: list[str] | None = None
    """The units the manifest lists (relpaths, sorted); None for a cache without one."""
    last_run: dict[str, Any] | None = None
    """The manifest's record of the last ``pvu cache`` run (None without one)."""
    resized: dict[str, int] = field(default_factory=dict)
    """Damaged units whose file has another size than recorded: relpath -> size in bytes."""
    damaged_pages: set[str] = field(default_factory=set)
    """Damaged units whose pages fail (:func:`check_pages`): their size and footer are as
    recorded, so ``pvu cache`` keeps them until they are deleted."""

    @property
    def ok(self) -> bool:
        """Whether every unit the manifest lists is in storage as recorded."""
        return not self.damaged

    def refusal(self) -> str:
        """A message naming the damaged units and the command that repairs the cache."""
        delete = "deleting the units whose pages fail, then " if self.damaged_pages else ""
        problem = "does not match its manifest" if self.listed is not None else "has no manifest"
        return (
            f"cache {self.url} {problem}: {counted(len(self.damaged), 'unit')} missing or "
            f"damaged: {self._named_damage()}. "
            f"Repair it by {delete}re-running the `pvu cache` command that wrote it, every flag "
            f"the same (`pvu info {self.url}` shows the settings it was made with; other ones "
            "are refused): it recomputes these units (but keeps one the duplicate-key pass "
            "rewrote before a kill, as its footer records it) and keeps the rest."
        )

    def being_written(self, writer: Holder) -> str:
        """A message for units that differ while ``writer``, a live run, writes the cache."""
        return (
            f"cache {self.url} is still being written, by {writer.describe(time.time())}: "
            f"{counted(len(self.damaged), 'unit')} differing from its manifest as that run "
            f"rewrites units: {self._named_damage()}. Wait until it finishes, then run this "
            "command again (if the units still differ then, re-running that `pvu cache` command "
            "repairs them)."
        )

    def _named_damage(self) -> str:
        """The first ``NAMED`` damaged units, each with what is wrong, and how many more."""
        named = [f"{path} ({why})" for path, why in sorted(self.damaged.items())[:NAMED]]
        more = len(self.damaged) - len(named)
        return "; ".join(named) + (f"; and {more} more" if more else "")


#: The name of a cache's epoch folder (``epoch=0000``, as :func:`unit_path` writes it).
EPOCH_FOLDER = re.compile(r"epoch=[0-9]+")


#: How many folders below a folder :func:`caches_under` looks for caches, and in how many
#: folders at most (an output at a bucket's top would list thousands).
NESTED_CACHE_DEPTH = 2
NESTED_CACHE_LISTINGS = 100


#: Caches named where a folder holding caches is given as one.
SHOWN_CACHES = 5


def held_caches_note(url: str) -> str:
    """A note naming the caches a few folders below ``url`` (:func:`caches_under`), for a
    folder of caches given where one cache is wanted; empty where it holds none."""
    held = list(itertools.islice(caches_under(url), SHOWN_CACHES + 1))
    if not held:
        return ""
    more = ", ..." if len(held) > SHOWN_CACHES else ""
    return f"; it holds the cache(s) {', '.join(held[:SHOWN_CACHES])}{more}: give one of those"


def caches_under(url: str) -> Iterator[str]:
    """The caches (folders holding a ``_manifest.json``) from one to ``NESTED_CACHE_DEPTH``
    folders below ``url``, nearest first. One listing per folder, ``NESTED_CACHE_LISTINGS`` at
    most; ``epoch=<number>`` folders (a cache's units) are not listed, so the cost is that of
    the tree's top, whatever the caches hold."""
    fs, path = fsspec.core.url_to_fs(url)
    folders = [path.rstrip("/")]
    listed = 0
    for depth in range(NESTED_CACHE_DEPTH + 1):
        below = []
        for folder in folders[: NESTED_CACHE_LISTINGS - listed]:
            listed += 1
            try:
                entries = list_folder(fs, folder)
            except FileNotFoundError:  # an output not made yet
                continue
            names = {entry_name(entry): entry for entry in entries}
            if depth and MANIFEST_NAME in names:
                yield storage_url(fs, folder)
            below += [
                entry["name"].rstrip("/")
                for name, entry in names.items()
                if entry["type"] == "directory" and not EPOCH_FOLDER.fullmatch(name)
            ]
        folders = below


def list_unit_files(url: str) -> dict[str, int]:
    """Size of every committed unit file under the cache at ``url``, by path relative to it.

    One listing of the root and one of each ``epoch=<number>`` folder, bypassing listing
    caches; staging and hidden files (``_*``, ``.*``) are not units, nor are the files of an
    ``epoch=`` folder of another name (``epoch=abc``: warned of, naming it).
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        folders = list_folder(fs, root)
    except FileNotFoundError:
        return {}
    sizes: dict[str, int] = {}
    for folder in folders:
        name = entry_name(folder)
        if folder["type"] != "directory" or not name.startswith("epoch="):
            continue
        if not EPOCH_FOLDER.fullmatch(name):
            log.warning(
                "left out %s/%s: not an epoch folder (pvu cache writes epoch=<number>, as "
                "epoch=0000), though a Parquet reader of the cache's folder takes it for one; "
                "move it out of the cache",
                *(url.rstrip("/"), name),
            )
            continue
        for entry in list_folder(fs, folder["name"]):
            filename = entry_name(entry)
            if (
                entry["type"] == "file"
                and filename.endswith(".parquet")
                and not filename.startswith(("_", "."))
            ):
                sizes[f"{name}/{filename}"] = int(entry["size"])
    return sizes


#: Bytes read from a unit's end for its footer (pyarrow's own first read); a longer footer
#: takes a second read.
FOOTER_READ = 64 * 1024


def read_footer(url: str, relpath: str, size: int | None = None) -> pq.FileMetaData:
    """The Parquet footer of unit ``relpath`` of the cache at ``url`` (``size`` bytes, if known:
    storage is then not asked).

    The file's end is read under :func:`retry` and parsed from memory, so a storage error is
    raised as such, and bytes that are no footer (cut short, not Parquet, damaged in place)
    raise ``ValueError``: the file is at fault.
    """
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/{relpath}"
    known = {} if size is None else {"size": size}

    def read_end(length: int) -> bytes:
        with fs.open(path, "rb", **known) as handle:
            handle.seek(max(0, handle.seek(0, 2) - length))
            return handle.read()

    what = f"read the footer of {url.rstrip('/')}/{relpath}"
    end = retry(lambda: read_end(FOOTER_READ), what=what)
    length = 8 + int.from_bytes(end[-8:-4], "little")  # the footer, its length and "PAR1"
    if len(end) == FOOTER_READ < length:
        end = retry(lambda: read_end(length), what=what)
    try:
        return pq.read_metadata(pa.BufferReader(end))
    except OSError as error:  # pyarrow's ArrowIOError: thrift or the schema does not decode
        raise ValueError(str(error).strip()) from None


#: A unit's footer, or what reading it said of the file: gone, or not (or no longer) Parquet.
FooterRead = pq.FileMetaData | FileNotFoundError | ValueError


def read_footers(
    url: str, sizes: Mapping[str, int], *, io_threads: int = 16
) -> Iterator[tuple[str, FooterRead]]:
    """The footer of each unit ``sizes`` lists (relpath -> bytes) of the cache at ``url``, read
    ``io_threads`` at a time (one ranged read each) and yielded in ``sizes``' order, at most
    ``2 x io_threads`` read ahead of the caller (a parsed footer takes ~10x its bytes, ~280 KB
    for a unit of 32 row groups: reading them all ahead held ~830 MB at 3,000 units).

    A file gone or not Parquet yields its error in place of the footer; a storage error that
    outlasts its retries says nothing of the file: it is raised, in its unit's turn.
    """

    def read(relpath: str) -> FooterRead:
        try:
            return read_footer(url, relpath, sizes[relpath])
        except (FileNotFoundError, ValueError) as error:  # ValueError: pyarrow's ArrowInvalid
            return error

    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        ahead: deque[tuple[str, Future[FooterRead]]] = deque()
        try:
            for relpath in sizes:
                ahead.append((relpath, pool.submit(read, relpath)))
                if len(ahead) > 2 * io_threads:
                    done, future = ahead.popleft()
                    yield done, future.result()
            while ahead:
                done, future = ahead.popleft()
                yield done, future.result()
        finally:  # raised or left early: the reads not begun are not made (nor waited for)
            pool.shutdown(cancel_futures=True)


def footer_problem(
    entry: Mapping[str, Any], footer: pq.FileMetaData, provenance: Mapping[str, Any]
) -> str | None:
    """What in ``footer`` contradicts the manifest's ``entry`` and ``provenance``, if anything."""
    stats = read_unit_stats(footer.metadata)
    if stats is None:
        return "footer has no unit stats: not a pvu unit file"
    differ = [
        f"{name} {stats.get(name)!r}, manifest records {entry.get(name)!r}"
        for name in FOOTER_FIELDS
        if stats.get(name) != entry.get(name)
    ]
    if footer.num_rows != entry.get("rows"):
        differ.append(f"{footer.num_rows} rows, manifest records {entry.get('rows')}")
    try:
        found = read_provenance(footer.schema.to_arrow_schema())
        fields = sorted({d.split(":", 1)[0] for d in provenance_differences(found, provenance)})
        differ += [f"provenance differs in {', '.join(fields)}"] if fields else []
    except ValueError as error:
        differ.append(str(error))
    return "footer: " + "; ".join(differ) if differ else None


def check_cache(
    url: str,
    units: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    *,
    footers: bool = True,
    keep_footers: bool = True,
    io_threads: int = 16,
) -> CacheCheck:
    """Compare the manifest's ``units`` (and ``provenance``) with what storage holds at ``url``.

    ``footers=False`` checks presence and sizes only (the listing, no per-unit read);
    ``keep_footers=False`` drops each footer once checked (a reader or :func:`check_pages`
    needs them, a report does not).
    """
    stored = list_unit_files(url)
    check = CacheCheck(url.rstrip("/"), listed=sorted(units))
    check.orphans = {path: size for path, size in stored.items() if path not in units}
    present = []
    for relpath, entry in units.items():
        if relpath not in stored:
            check.damaged[relpath] = "missing"
        elif stored[relpath] != entry.get("bytes"):
            check.damaged[relpath] = (
                f"{stored[relpath]} bytes, manifest records {entry.get('bytes')}"
            )
            check.resized[relpath] = stored[relpath]
        else:
            present.append(relpath)
    if footers:
        sizes = {relpath: stored[relpath] for relpath in present}
        for relpath, footer in read_footers(url, sizes, io_threads=io_threads):
            if isinstance(footer, FileNotFoundError):
                check.damaged[relpath] = "missing"
            elif isinstance(footer, ValueError):
                check.damaged[relpath] = f"unreadable footer: {footer}"
            elif why := footer_problem(units[relpath], footer, provenance):
                check.damaged[relpath] = why
            elif keep_footers:
                check.footers[relpath] = footer  # readers index the cache from it
    return check


def page_problem(url: str, relpath: str, footer: pq.FileMetaData) -> str | None:
    """What is wrong with the pages of unit ``relpath`` of the cache at ``url``, if anything.

    The file is read whole (under :func:`retry`: storage errors are raised, not blamed on the
    file), then every row group is decoded from memory with each page's CRC-32 checked (units
    written before pvu stored CRCs have none to check), so what fails is in the bytes.
    """
    fs, root = fsspec.core.url_to_fs(url)
    data = read_bytes(fs, f"{root.rstrip('/')}/{relpath}")
    buffer = pa.BufferReader(data)
    parquet = pq.ParquetFile(buffer, metadata=footer, page_checksum_verification=True)
    for group in range(footer.num_row_groups):
        try:
            parquet.read_row_group(group, use_threads=False)
        except (OSError, ValueError) as error:  # pyarrow's decoding errors: the bytes are at fault
            why = "a page's bytes fail its CRC-32" if is_damaged_page(error) else str(error)
            return f"row group {group}: {why}"
    return None


def check_pages(check: CacheCheck, *, io_threads: int = 16) -> Generator[str, None, None]:
    """Read every page of the units ``check`` found sound (those whose footer it kept), in
    parallel; move those whose pages fail from ``check.footers`` to ``check.damaged`` and
    ``check.damaged_pages``. Yields each unit's relpath when it is done (for a progress bar)."""
    units = list(check.footers.items())
    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        try:
            found = pool.map(lambda unit: page_problem(check.url, *unit), units)
            for (relpath, _), why in zip(units, found, strict=True):
                if why:
                    del check.footers[relpath]
                    check.damaged[relpath] = why
                    check.damaged_pages.add(relpath)
                yield relpath
        finally:  # left early (its caller failed or was interrupted): the reads not begun are
            pool.shutdown(cancel_futures=True)  # not made, where the pool's exit made them all


def verify_cache(url: str, *, footers: bool = True, io_threads: int = 16) -> CacheCheck:
    """Check the cache at ``url`` against its ``_manifest.json`` (all is well without one)."""
    document = read_manifest(url)
    if document is None:
        return CacheCheck(url.rstrip("/"))
    check = check_cache(
        url, document["units"], document["provenance"], footers=footers, io_threads=io_threads
    )
    check.last_run = document.get("last_run")
    return check


def require_consistent(
    url: str, *, io_threads: int = 16, writer: Holder | None = None
) -> CacheCheck:
    """The check of ``url``; raises :class:`CacheMismatch` (naming units and the repair) unless
    it checks out.

    ``writer`` is the live run holding the cache's lock, looked for before the check: its
    duplicate-key pass rewrites units before it writes the manifest, so a unit that differs
    while it runs is no damage to repair; the refusal then says to wait for it (a run that
    took the lock during the check is looked for too).
    """
    check = verify_cache(url, io_threads=io_threads)
    if not check.ok:
        writer = writer or live_holder(url)
        raise CacheMismatch(check.refusal() if writer is None else check.being_written(writer))
    return check


def reconcile(manifest: Manifest, *, io_threads: int = 16) -> Manifest:
    """Make ``manifest`` agree with storage before a run, and write it; returns it.

    A damaged unit (missing, other size, footer of another unit) is forgotten and its file
    removed, so the run computes it again; the first ``NAMED`` are each logged with a warning
    naming it, the rest in one line (each at debug level). A unit the duplicate-key pass
    rewrote after the manifest's last write (the run killed before the next) is no damage: its
    footer's entry is recorded. An orphan
    (committed, never recorded) is adopted from its own footer, unless that footer is
    unreadable or names another unit (then it is removed and computed again); an orphan of
    another cache is refused with ``ProvenanceMismatch``. Orphans' footers are read in parallel
    (a cache whose manifest was moved aside is all orphans); one line says how many were adopted.
    """
    fs, root = fsspec.core.url_to_fs(manifest.root)
    check = check_cache(manifest.root, manifest.units, manifest.provenance, io_threads=io_threads)
    rewritten = rewritten_by_the_pass(check, manifest.units, manifest.provenance, io_threads)
    for relpath, entry in rewritten.items():
        del check.damaged[relpath]
        manifest.record(relpath, entry)
    if rewritten:
        log.info(
            "kept %s rewritten by the duplicate-key pass of a run stopped before it "
            "recorded the rewrite: %s",
            counted(len(rewritten), "unit"),
            _some(list(rewritten)),
        )
    for count, (relpath, why) in enumerate(sorted(check.damaged.items())):
        log.log(named_level(count), "recomputing %s/%s: %s", manifest.root, relpath, why)
        manifest.forget(relpath)
        if why != "missing":
            fs.rm(f"{root}/{relpath}")
    if len(check.damaged) > NAMED:
        missing = sum(why == "missing" for why in check.damaged.values())
        log.warning(
            "recomputing %s of %s (%s of all %s missing, the rest damaged); --verbose names each",
            *(counted(len(check.damaged) - NAMED, "more unit"), manifest.root, f"{missing:,}"),
            f"{len(check.damaged):,}",
        )
    orphans = dict(sorted(check.orphans.items()))
    adopted = []
    for relpath, footer in read_footers(manifest.root, orphans, io_threads=io_threads):
        entry = _orphan_entry(manifest, relpath, orphans[relpath], footer)
        if entry is None:
            fs.rm(f"{root}/{relpath}")
        elif entry:
            manifest.record(relpath, entry)
            adopted.append(relpath)
            log.debug("adopted committed unit %s missing from the manifest", relpath)
    if adopted:
        log.info(
            "adopted %s missing from the manifest: %s",
            counted(len(adopted), "committed unit"),
            _some(adopted),
        )
    manifest.flush(force=True)
    return manifest


def rewritten_by_the_pass(
    check: CacheCheck,
    units: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    io_threads: int = 16,
) -> dict[str, dict[str, Any]]:
    """The entries of the units ``check`` found resized whose footer records their manifest
    entry (in ``units``) with rows dropped as duplicates (:func:`after_drop`): the duplicate-key
    pass rewrote them after the manifest's last write, and ``pvu cache`` keeps them.
    relpath -> entry."""
    entries = {}
    for relpath, footer in read_footers(check.url, check.resized, io_threads=io_threads):
        if not isinstance(footer, pq.FileMetaData):
            continue
        dropped = units[relpath]["rows"] - footer.num_rows
        entry = {**after_drop(units[relpath], dropped), "bytes": check.resized[relpath]}
        if dropped > 0 and footer_problem(entry, footer, provenance) is None:
            entries[relpath] = entry
    return entries


def _some(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, and how many more there are."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more:,} more" if more > 0 else "")


def _orphan_entry(
    manifest: Manifest, relpath: str, size: int, footer: FooterRead
) -> dict[str, Any] | None:
    """The manifest entry an orphan's ``footer`` describes; None (logged) if it is an unusable
    unit, to remove; empty (logged) for a Parquet file that is not a pvu unit, left alone."""
    url = f"{manifest.root}/{relpath}"
    if isinstance(footer, FileNotFoundError):
        raise footer
    if isinstance(footer, ValueError):
        log.warning("recomputing %s: committed but unreadable (%s)", url, footer)
        return None
    try:
        stats = read_unit_stats(footer.metadata)
    except ValueError as error:
        log.warning("recomputing %s: its unit stats are unreadable (%s)", url, error)
        return None
    if stats is None:
        log.warning("left %s alone: a Parquet file, but not a pvu unit", url)
        return {}
    check_provenance(read_provenance(footer.schema.to_arrow_schema()), manifest.provenance, url)
    if relpath != unit_path(int(stats.get("epoch", -1)), str(stats.get("shard"))):
        log.warning("recomputing %s: its footer describes another unit", url)
        return None
    return {**stats, "bytes": size}
