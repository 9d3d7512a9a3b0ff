"""Retry of storage calls: one policy per layer, so no error is retried at two of them.

A storage call passes three layers; each retries what only it can see, once:

============  ===========================================================================
botocore      one HTTP request: 5xx, throttling (``SlowDown``), a connection refused, reset
              or timed out before the answer. Standard mode, ``REQUEST_ATTEMPTS`` tries,
              exponential backoff with full jitter (at most 20 s a wait).
s3fs          nothing (``retries = 1``): its own loop would repeat botocore's tries, five
              times over, nested once more around each ranged read.
``retry()``   one storage operation (open, read at a byte, commit, manifest write): an
              answer broken off mid-body (``TRANSIENT_ERRORS``), which no per-request retry
              sees, by reopening or rewriting. Errors the layer below already retried, and
              permanent ones (``PERMANENT_ERRORS``: 404, 403) are raised at once, the URL
              prefixed to the message.
============  ===========================================================================

Above them, ``pipeline.cache.distribute`` runs a failed unit again (``--max-attempts``) unless
its error is permanent, which fails the unit at once, or a full store (``StorageFull``), the
output's bucket gone (``BucketGone``) or a unit's write denied (``OutputDenied``), which stops
the run: every other unit would fail the same way. A missing object or a denied access is
thus one request, failed within a second; a store that stays down costs
``REQUEST_ATTEMPTS`` requests per try of the unit. :func:`configure_storage_clients` sets the
two lower layers; importing ``pipeline`` calls it, so every pvu process (driver, Ray actors)
runs the same policy. A user's own fsspec configuration for ``s3`` (``FSSPEC_S3`` or
``~/.config/fsspec``) takes precedence over these defaults; botocore ``config_kwargs`` of theirs
without ``retries`` (an ``s3`` addressing style, say) keep the retries.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import posixpath
import random
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
import fsspec.config
import s3fs
from aiobotocore.response import AioReadTimeoutError
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Tries botocore gives each HTTP request (the first one included).
REQUEST_ATTEMPTS = 5
#: Errors no retry can fix: the object is not there, or we may not read it.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
#: An answer broken off after it began, or a connection that failed mid-stream: what the layer
#: below cannot retry. ``ConnectionError`` and ``TimeoutError`` are what non-S3 filesystems
#: raise for the same; aiohttp's and botocore's own types are not ``OSError``. A body that
#: stalls mid-read is aiobotocore's ``AioReadTimeoutError``; botocore's plain
#: ``ReadTimeoutError`` (no answer at all) is not listed: botocore has retried it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    http.client.IncompleteRead,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    AioReadTimeoutError,
)
#: pyarrow's words for a Parquet page whose CRC-32 does not match: no read can fix the file.
_DAMAGED_PAGE = "CRC checksum verification failed"
#: Other errors from storage: raised at once, with the operation and URL in the message.
STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    botocore.exceptions.BotoCoreError,
    aiohttp.ClientError,
)

#: ``errno`` values of a write to a full disk or past a quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """A write failed because its storage is full or over quota: raised by :func:`retry` in
    place of the ``OSError`` (ENOSPC, EDQUOT); no retry of any layer can fix it."""


class BucketGone(FileNotFoundError):
    """The bucket an output is written to no longer exists (deleted mid-run): pvu does not
    create buckets, so every later write would fail too."""


class OutputDenied(PermissionError):
    """A write to an output was denied (a policy changed, credentials expired mid-run): every
    later write would be too."""


class StorageRefused(Exception):
    """A storage check's finding that this process's settings cannot use the job's storage (no
    credentials, endpoint unreachable, access denied, bucket missing): what a cache actor's
    check raises where its node's configuration, not a passing fault, is at fault
    (``pipeline.cache.distribute.check_node`` leaves that node out)."""


_jitter = random.Random()  # private: the global ``random`` is seeded per sample elsewhere


def configure_storage_clients() -> None:
    """Give botocore the request retries and s3fs none (see the module docstring)."""
    s3fs.S3FileSystem.retries = 1
    config = fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": REQUEST_ATTEMPTS})


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()``; retry ``TRANSIENT_ERRORS`` with exponential backoff and jitter.

    ``what`` names the operation and its URL (``"open s3://b/x.tar"``); it is logged with every
    retry and prefixed to the message of the error finally raised. Permanent errors and other
    storage errors are raised at once, non-storage errors (bugs) untouched; a transient error
    that outlasts ``attempts`` is raised with the count.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if base_delay < 0:
        raise ValueError(f"base_delay must be >= 0, got {base_delay}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS as error:
            _reraise(error, f"{what} failed")
        except TRANSIENT_ERRORS as error:
            if attempt == attempts:
                logger.error("%s failed after %d attempts: %r", what, attempts, error)
                _reraise(error, f"{what} failed after {attempts} attempts")
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
            logger.warning(
                "%s: %r (attempt %d of %d), retrying in %.2fs",
                what,
                error,
                attempt,
                attempts,
                delay,
            )
            sleep(delay)
        except STORAGE_ERRORS as error:
            _reraise(error, f"{what} failed")
    raise AssertionError("unreachable")  # pragma: no cover


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole object at ``path`` on ``fs``, read under :func:`retry`. A local FIFO, socket or
    device is refused with an ``OSError``, unread: a FIFO's read waits for a writer forever."""

    def read() -> bytes:
        if isinstance(fs, LocalFileSystem):
            _refuse_special_file(path)
        return fs.cat_file(path)

    return retry(read, what=f"read {fs.unstrip_protocol(path)}")


def _refuse_special_file(path: str) -> None:
    """Raise ``OSError`` where the local ``path`` (through links) is a FIFO, socket or device;
    a folder or a missing path is left to the read, which names it."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OSError(
            errno.EINVAL, "not a regular file (a FIFO, socket or device), whose read may never end"
        )


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is on ``fs``, asked under :func:`retry`: a store that keeps failing the
    request (503s past botocore's tries) is named with the URL, not a bare
    ``[Errno 16] Service Unavailable``."""
    return retry(lambda: fs.exists(path), what=f"look for {fs.unstrip_protocol(path)}")


def list_folder(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """The entries (``fs.ls`` details) of the folder ``path``, listed afresh (not from a
    listing cache) under :func:`retry`; ``FileNotFoundError`` if there is none."""
    what = f"list {fs.unstrip_protocol(path)}"
    return retry(lambda: fs.ls(path, detail=True, refresh=True), what=what)


def read_url(url: str) -> bytes:
    """The whole object at ``url`` (any fsspec URL or local path), read under :func:`retry`."""
    return read_bytes(*fsspec.core.url_to_fs(url))


def move_file(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move ``source`` (a file written aside) onto ``target`` on ``fs``, under :func:`retry`.

    An object store moves by a copy and a delete; when a try's answer was lost after its
    delete, the next try finds no source: the move is done, once ``target`` is there."""
    tries = 0

    def move() -> None:
        nonlocal tries
        tries += 1
        try:
            place(fs, source, target)
        except FileNotFoundError:
            if tries == 1 or fs.exists(source) or not fs.exists(target):
                raise

    what = f"move {fs.unstrip_protocol(source)} to {fs.unstrip_protocol(target)}"
    retry(move, what=what)


def place(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move the file ``source``, written aside, onto ``target`` (not retried: callers retry the
    write and the move together), so that not even a power loss leaves ``target`` empty.

    On a local disk the source's data is synced before the rename and the target's folder
    after it: XFS and ext4 may commit a rename before the renamed file's data, and after a
    power loss (a killed process loses nothing) show the file empty. An object store's move
    needs neither: an object is whole once written.
    """
    sync_local(fs, source)
    fs.mv(source, target)
    sync_local(fs, posixpath.dirname(target))


def sync_local(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Flush the local file or folder ``path`` to the disk (``fsync``); nothing on other
    file systems (an object store has no such step)."""
    if not isinstance(fs, LocalFileSystem):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the whole object at ``path`` on ``fs``, under :func:`retry` (a full
    disk, say, is then named with the file). A local file left part-written is removed, but
    not one the write was refused (permission denied: nothing of it was touched); an object
    store's put leaves nothing, or the object as it was, to keep. A local file's data is on
    the disk when this returns (:func:`sync_local`)."""

    def write() -> None:
        fs.pipe_file(path, data)
        sync_local(fs, path)

    try:
        retry(write, what=f"write {fs.unstrip_protocol(path)}")
    except PermissionError:
        raise
    except OSError:
        remove_partial(fs, path)
        raise


def remove_partial(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a local file a failed write left part-written; an object store's failed put
    leaves nothing (or the object as it was), which is not ours to remove."""
    if isinstance(fs, LocalFileSystem):
        with contextlib.suppress(OSError):
            os.remove(path)


#: fsspec protocols of object stores: buckets and keys, no folders.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"})


def make_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the folder ``path``, except on an object store: it needs no folders, and s3fs's
    ``makedirs`` creates a missing bucket, which would bring back one deleted mid-run without
    its policy, encryption or lifecycle.

    On a local disk the folder that gained each new folder is synced (:func:`sync_local`),
    once, as the folder is created: else a power loss may take the new folder, and with it the
    files later moved into it, though :func:`place` synced the folder holding them. A folder
    that is there already costs a ``stat``, no sync.
    """
    if is_object_store(fs):
        return
    created = _missing_folders(path) if isinstance(fs, LocalFileSystem) else []
    fs.makedirs(path, exist_ok=True)
    for folder in created:
        sync_local(fs, posixpath.dirname(folder))


def _missing_folders(path: str) -> list[str]:
    """The local folders ``makedirs(path)`` would create: ``path`` and those of its parents
    not there, the outermost first."""
    missing: list[str] = []
    path = os.path.abspath(path)  # no trailing "/", and a relative path's parents too
    while not os.path.lexists(path) and path != posixpath.dirname(path):
        missing.append(path)
        path = posixpath.dirname(path)
    return missing[::-1]


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store (S3, GCS, Azure): buckets and keys, no folders."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & OBJECT_STORES)


@contextlib.contextmanager
def bucket_kept(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """Raise a ``FileNotFoundError`` from inside as :class:`BucketGone` where the bucket of
    ``path`` is what is missing; other errors, and those of stores without buckets, pass."""
    try:
        yield
    except FileNotFoundError as error:
        bucket = path.lstrip("/").split("/")[0] if is_object_store(fs) else None
        if bucket is None or _has_bucket(fs, bucket):
            raise
        raise BucketGone(
            f"the bucket {bucket} of {fs.unstrip_protocol(path)} is gone (deleted while pvu "
            "ran?); pvu does not create buckets: re-create it as it was (its policy, "
            "encryption, lifecycle) and run the same command again, or give another output"
        ) from error


def _has_bucket(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """Whether ``bucket`` exists on the object store ``fs`` (asked anew, not from a cache)."""
    fs.invalidate_cache(bucket)
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        return False
    except OSError:  # denied or unreachable: not known to be gone
        return True
    return True


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Raise storage errors from inside again as :func:`retry` raises them, ``what`` (the
    operation and its URL) prefixed: for writes that cannot be retried part-way, such as a
    stream, and whose errors (a full disk) name no file."""
    try:
        yield
    except STORAGE_ERRORS as error:
        _reraise(error, f"{what} failed")


def is_damaged_page(error: BaseException) -> bool:
    """Whether ``error`` is pyarrow's refusal of a Parquet page whose CRC-32 does not match."""
    return _DAMAGED_PAGE in str(error)


def _reraise(error: BaseException, context: str) -> NoReturn:
    """Raise the error again as an ``OSError`` with ``context`` prefixed, chained to it.

    :class:`StorageFull` for a full disk or quota; ``PermissionError`` for a read-only file
    system (EROFS), a denied write like any other; the same type where it is another
    ``OSError`` whose constructor takes a message; else ``TimeoutError``, ``ConnectionError``
    or ``OSError``, so that callers catch every storage error as ``OSError`` (aiohttp's and
    botocore's are not).
    """
    message = f"{context}: {type(error).__name__}: {error}"
    if is_damaged_page(error):
        message += (
            ". The file's stored bytes are damaged; delete it and re-run the `pvu cache` "
            "command that wrote it, which recomputes a missing unit and keeps the rest"
        )
    wrapped: BaseException | None = None
    if isinstance(error, OSError) and error.errno in _FULL:
        wrapped = StorageFull(message)
    elif isinstance(error, OSError) and error.errno == errno.EROFS:
        wrapped = PermissionError(message)  # a read-only mount denies every write alike
    elif isinstance(error, OSError):
        try:
            wrapped = type(error)(message)
        except Exception:  # a constructor that takes other arguments
            wrapped = None
    if wrapped is None:
        kind = next((k for k in (TimeoutError, ConnectionError) if isinstance(error, k)), OSError)
        wrapped = kind(message)
    raise wrapped from error
