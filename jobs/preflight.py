"""Checks of a job's storage inputs before any work: seconds, and a message saying what to do.

Object stores fail in ways whose raw errors (botocore's ``NoCredentialsError``, a 403 deep in a
listing) name neither the flag nor the fix; each check here turns them into one
:class:`~jobs.terminal.UserError` that names the flag, the URL and what to change.
"""

from __future__ import annotations

import os
import posixpath

import botocore.exceptions
import fsspec
from fsspec.implementations.local import LocalFileSystem

from jobs.terminal import UserError
from pipeline.cache.manifest import MANIFEST_NAME
from pipeline.cache.shards import storage_url
from pipeline.cache.verify import caches_under
from pipeline.retry import StorageRefused

CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
    "for an S3-compatible store such as MinIO or Ceph; for a public bucket, FSSPEC_S3_ANON=true "
    "reads it without any"
)


def check_storage(url: str, *, flag: str, must_exist: bool = False) -> None:
    """Raise :class:`UserError` if ``url``'s store cannot be used: no credentials, endpoint
    unreachable, bucket missing or access denied; with ``must_exist``, if ``url`` is absent.
    ``url`` is a job config's :data:`~jobs.config.PathOrUrl`: neither empty nor space-padded."""
    where = f"{flag}{url}" if flag.endswith("=") else f"{flag} {url}"  # --dataset NAME=URL
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as error:  # "Protocol not known: foo", "Install gcsfs ..."
        raise UserError(f"{where}: {error}; give a local path or an fsspec URL") from None
    # an object store's bucket (s3fs, gcsfs and adlfs split paths so); other stores (local, HTTP
    # whose paths are whole URLs, hf:// whose first part is "datasets") have none to probe
    bucket = fs.split_path(path)[0] if hasattr(fs, "split_path") else None
    try:
        if bucket is not None:
            fs.ls(bucket, detail=False)
        if must_exist and not fs.exists(path):
            raise UserError(f"{where} does not exist; check the path (a typo, or another prefix?)")
    except botocore.exceptions.NoCredentialsError:
        raise UserError(
            f"{where}: no credentials for {url.split('://')[0]}://; {CREDENTIALS_HINT}"
        ) from None
    except botocore.exceptions.EndpointConnectionError as error:
        raise UserError(
            f"{where}: cannot reach the storage endpoint ({error}); check AWS_ENDPOINT_URL "
            "and that the store is up"
        ) from None
    except PermissionError:
        raise UserError(
            f"{where}: access to bucket {bucket} denied; use credentials that may read and "
            "write it, or another bucket"
        ) from None
    except FileNotFoundError:
        raise UserError(
            f"{where}: bucket {bucket} does not exist; create it or fix the URL"
        ) from None


def check_each_storage(urls: list[tuple[str, str]]) -> None:
    """:func:`check_storage` of each ``(flag, url)``: what each cache actor checks as it
    starts, on its own node, whose S3 settings may not be the driver's. Its refusal is raised
    as :class:`~pipeline.retry.StorageRefused` (the node is left out); any other
    error as it is (the actor's start failed, and is tried again)."""
    try:
        for flag, url in urls:
            check_storage(url, flag=flag)
    except UserError as error:
        raise StorageRefused(str(error)) from None


def check_output_folder(url: str, *, flag: str) -> None:
    """:func:`check_storage`, and: ``url`` is not a file, and, local, it can be created (its
    nearest existing parent is a writable folder); so an output that cannot be written is named
    before the work, not after it. Creates nothing."""
    check_storage(url, flag=flag)
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        raise UserError(f"{flag} {url} is a file; give a folder")
    if isinstance(fs, LocalFileSystem):
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.exists(existing):
            raise UserError(
                f"{flag} {url}: {existing} links to {os.readlink(existing)}, which does not "
                "exist (a volume not mounted?)"
            )
        if not os.path.isdir(existing):
            raise UserError(f"{flag} {url}: cannot create the folder, {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {url}: {existing} is not writable; give another folder")
        longest = max(os.path.relpath(path, existing).split(os.sep), key=len)
        limit = os.pathconf(existing, "PC_NAME_MAX")
        if len(os.fsencode(longest)) > limit:
            raise UserError(
                f"{flag} {url}: the name {longest[:24]}... is over the {limit} bytes a name "
                f"may have under {existing}"
            )


def check_not_inside(url: str, folder: str, *, flag: str, folder_flag: str, why: str) -> None:
    """Refuse an output ``url`` at or under the input ``folder`` (links resolved, locally);
    ``why`` says what that would break."""
    (out_kind, out_path), (in_kind, in_path) = _located(url), _located(folder)
    if out_kind is in_kind and out_path.startswith(in_path):
        named = folder_flag if folder_flag.endswith("=") else f"{folder_flag} "  # --dataset d=
        raise UserError(f"{flag} {url} is inside {named}{folder}: {why}")


def check_holds_no_shards(url: str, shards: list[str], *, flag: str) -> None:
    """Refuse an output ``url`` whose folder holds (at any depth) one of the job's ``shards``:
    its cache's units would lie among them, where a Parquet reader of the cache's folder
    (pyarrow's dataset, as the README shows) meets the tar files and fails. One lookup per
    folder of shards."""
    out_kind, out_path = _located(url)
    first_in: dict[str, str] = {}  # each folder of shards, and its first shard
    for shard in shards:
        first_in.setdefault(posixpath.dirname(shard), shard)
    for folder, first in first_in.items():
        kind, path = _located(folder)
        if kind is out_kind and path.startswith(out_path):
            raise UserError(
                f"{flag} {url} holds the shards it would read ({first}): its units would lie "
                "among them, where a Parquet reader of the cache's folder (pyarrow's dataset, "
                "as the README shows) meets the tar files and fails; give an --output beside "
                "the shards' folder, not at or above it"
            )


def _located(url: str) -> tuple[type, str]:
    """``url``'s filesystem type and its path with a trailing ``/`` (links resolved, locally)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    return type(fs), f"{path.rstrip('/')}/"


#: Why an output may not lie in a cache (``why`` of :func:`check_not_inside`).
INSIDE_A_CACHE = (
    "its files would sit among the cache's units, where a Parquet reader of the cache's "
    "folder (pyarrow's dataset, as the README shows) meets files that are no Parquet; give "
    "a folder outside the cache"
)


def check_not_in_a_cache(url: str, *, flag: str, itself: bool = False) -> None:
    """Refuse an output ``url`` below a folder that holds a cache (its ``_manifest.json``): a
    Parquet reader of that cache's folder would read the nested cache's rows as its own. With
    ``itself`` (an output of files that are no Parquet: ``pvu shards``'s tars), ``url`` may
    not be a cache either, and the refusal says that such a reader would meet them."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    why = (
        "meets files that are no Parquet" if itself else "would take this cache's rows for its own"
    )
    if itself and fs.isfile(f"{path}/{MANIFEST_NAME}"):
        raise UserError(
            f"{flag} {url} is the cache {storage_url(fs, path)}: a Parquet reader of the "
            f"cache's folder (pyarrow's dataset, as the README shows) {why}; give a folder "
            "outside it"
        )
    parent = posixpath.dirname(path)
    while parent and parent != posixpath.dirname(parent):
        if fs.isfile(f"{parent}/{MANIFEST_NAME}"):
            raise UserError(
                f"{flag} {url} is inside the cache {storage_url(fs, parent)}: a Parquet reader "
                f"of that cache's folder (pyarrow's dataset, as the README shows) {why}; give a "
                "folder outside it"
            )
        parent = posixpath.dirname(parent)


def check_holds_no_cache(url: str, *, flag: str) -> None:
    """Refuse an output ``url`` holding a cache (its ``_manifest.json``) a few folders down
    (:func:`caches_under`: a bounded number of listings): this cache's units would lie beside
    it, and a Parquet reader of ``url`` would read both."""
    held = next(caches_under(url), None)
    if held is not None:
        raise UserError(
            f"{flag} {url} holds the cache {held}: this cache's units would lie beside that "
            "one's, and a Parquet reader of its folder (pyarrow's dataset, as the README "
            "shows) would take both caches' rows for its own; give a folder that holds no cache"
        )


def check_apart(outputs: list[tuple[str, str]]) -> None:
    """Refuse one of ``outputs`` (``(flag, url)``, a job's targets) at or under another: its
    cache would lie in the other's folder, and the same command run again would be refused by
    :func:`check_not_in_a_cache` (the outer one holds a manifest by then)."""
    for index, (flag, url) in enumerate(outputs):
        for other, (other_flag, other_url) in enumerate(outputs):
            if other != index:
                check_not_inside(url, other_url, flag=flag, folder_flag=other_flag, why=_APART)


_APART = (
    "one cache would lie in the other's folder, where a Parquet reader of that folder "
    "(pyarrow's dataset, as the README shows) takes its rows for the other's; give each target "
    "a folder of its own"
)
